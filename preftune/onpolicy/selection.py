"""Which judged samples become training rows, per method. Each function takes one prompt's samples and their
win rates P̂ (``preferences.win_rates``) and returns rows in the data shapes ``preftune train`` reads: pairs
(``prompt``, ``chosen``, ``rejected``) or scored samples (``prompt``, ``completion``, ``score``). A text prompt
gives text rows, a message prompt conversational rows. Max/min keep the first of equal rates (file order).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..feedback.judges import Prompt


def as_completion(prompt: Prompt, text: str) -> str | list[dict]:
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def pair_row(prompt: Prompt, chosen: str, rejected: str, rate_chosen: float, rate_rejected: float) -> dict:
    return {"prompt": prompt, "chosen": as_completion(prompt, chosen), "rejected": as_completion(prompt, rejected),
            "score_chosen": rate_chosen, "score_rejected": rate_rejected}


def _scored(texts: Sequence[str], rates: Sequence[float | None]) -> list[tuple[int, float]]:
    return [(i, r) for i, r in enumerate(rates) if r is not None and texts[i].strip()]


def iterative_rows(prompt: Prompt, texts: Sequence[str], rates: Sequence[float | None], pairs: str,
                   min_margin: float, counts: Counter) -> list[dict]:
    """Iterative DPO: ``best_vs_worst`` (one pair) or ``all_pairs`` (every two samples whose rates differ by
    more than ``min_margin``)."""
    scored = _scored(texts, rates)
    if len(scored) < 2:
        counts["prompts_too_few_scored"] += 1
        return []
    if pairs == "best_vs_worst":
        best, worst = max(scored, key=lambda c: c[1]), min(scored, key=lambda c: c[1])
        if best[1] - worst[1] <= min_margin or texts[best[0]] == texts[worst[0]]:
            counts["tied_prompts"] += 1
            return []
        return [pair_row(prompt, texts[best[0]], texts[worst[0]], best[1], worst[1])]
    rows = []
    for n, (i, a) in enumerate(scored):
        for j, b in scored[n + 1 :]:
            if abs(a - b) <= min_margin or texts[i] == texts[j]:
                counts["tied_pairs"] += 1
            elif a > b:
                rows.append(pair_row(prompt, texts[i], texts[j], a, b))
            else:
                rows.append(pair_row(prompt, texts[j], texts[i], b, a))
    return rows


def dno_rows(prompt: Prompt, texts: Sequence[str], rates: Sequence[float | None], min_margin: float,
             counts: Counter) -> list[dict]:
    """DNO-Prct (Rosset et al. 2024, Algorithm 2): the sample with the highest win rate against the others
    (the teacher's completion among them, when given) against the one with the lowest, kept only when the
    two win rates differ by at least ``min_margin`` (the large-margin filter of §4)."""
    scored = _scored(texts, rates)
    if len(scored) < 2:
        counts["prompts_too_few_scored"] += 1
        return []
    best, worst = max(scored, key=lambda c: c[1]), min(scored, key=lambda c: c[1])
    if best[1] - worst[1] < min_margin or texts[best[0]] == texts[worst[0]] or best[1] == worst[1]:
        counts["below_margin"] += 1
        return []
    return [pair_row(prompt, texts[best[0]], texts[worst[0]], best[1], worst[1])]


def sppo_rows(prompt: Prompt, texts: Sequence[str], rates: Sequence[float | None], samples: str,
              counts: Counter) -> list[dict]:
    """SPPO (Wu et al. 2024, §5): scored rows ``score = P̂``; ``winner_loser`` keeps the samples with the highest
    and the lowest P̂ (as the paper's experiments do), ``all`` every sample."""
    scored = _scored(texts, rates)
    if len(scored) < 2:
        counts["prompts_too_few_scored"] += 1
        return []
    if samples == "winner_loser":
        best, worst = max(scored, key=lambda c: c[1]), min(scored, key=lambda c: c[1])
        scored = [best, worst] if best[0] != worst[0] else [best]
    return [{"prompt": prompt, "completion": as_completion(prompt, texts[i]), "score": rate} for i, rate in scored]
