"""Win rate of a model against a baseline from a judge's verdicts, with ties and a bootstrap interval.

A verdict is P(model's completion is better) in [0, 1] (``Judge.compare``): 1 a win, 0 a loss, 0.5 a tie
(a pairwise judge asked in both orders may give any value in between; above 0.5 counts as a win, below as a
loss). The win rate is the mean verdict, so a tie counts as half a win: 3 wins, 1 tie and 1 loss give
(3 + 0.5) / 5 = 0.7. Verdicts of one prompt (its K samples) are averaged first and the prompts weigh
equally, because prompts, not samples, are the independent draws; the 95% interval is the percentile
bootstrap over prompts (Efron & Tibshirani 1993, ch. 13), seeded so that a rerun gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class WinRate:
    win_rate: float  # mean verdict over prompts, ties counted as half
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    no_result: int  # verdicts the judge could not give (None): left out of everything above
    comparisons: int  # verdicts given
    prompts: int  # prompts with at least one verdict
    confidence: float
    bootstrap_samples: int
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_interval(values: Sequence[float], samples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def win_rate(verdicts: Sequence[Sequence[float | None]], samples: int = 1000, confidence: float = 0.95,
             seed: int = 0) -> WinRate:
    """``verdicts[p]``: the verdicts for prompt p (one per sample compared), None where the judge gave none."""
    flat = [v for per_prompt in verdicts for v in per_prompt if v is not None]
    per_prompt = [float(np.mean(given)) for given in ([v for v in vs if v is not None] for vs in verdicts) if given]
    point = float(np.mean(per_prompt)) if per_prompt else float("nan")
    low, high = bootstrap_interval(per_prompt, samples, confidence, seed)
    return WinRate(
        win_rate=point, ci_low=low, ci_high=high,
        wins=sum(v > 0.5 for v in flat), ties=sum(v == 0.5 for v in flat), losses=sum(v < 0.5 for v in flat),
        no_result=sum(v is None for vs in verdicts for v in vs), comparisons=len(flat), prompts=len(per_prompt),
        confidence=confidence, bootstrap_samples=samples, seed=seed,
    )
