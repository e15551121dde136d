"""A judge's verdicts on groups of samples: the win matrix P[i][j] = P(y_i ≻ y_j | x) of each prompt's samples,
and each sample's win rate against the others, P̂(y_i) = mean_{j≠i} P[i][j] (the self-play quantity of SPPO,
DNO and SPO).

A pairwise judge is asked about every two distinct samples once (P[j][i] = 1 - P[i][j]). A pointwise judge
scores each sample once; P[i][j] is then 1 / ½ / 0 as the score is above / equal to / below (``hard``), or
σ(s_i - s_j) (``bradley_terry``: a Bradley–Terry reward model's score difference is a log-odds, which is how
SPPO's official code turns PairRM scores into probabilities). Identical texts are ½ without asking. A verdict
the judge could not give is None and is left out of the win rate (``no_result`` counts them).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from ..feedback.judges import Judge, Prompt, compare_within_groups, preference_from_scores, score_groups

PointwiseAs = Literal["hard", "bradley_terry"]
Matrix = list[list[float | None]]


def _from_scores(first: float | None, second: float | None, mode: PointwiseAs) -> float | None:
    if mode == "hard" or first is None or second is None:
        return preference_from_scores(first, second)
    return 1.0 / (1.0 + math.exp(second - first))  # σ(s_i - s_j)


def win_matrices(judge: Judge, prompts: Sequence[Prompt], groups: Sequence[Sequence[str]],
                 pointwise_as: PointwiseAs = "hard", counts: Counter | None = None
                 ) -> tuple[list[Matrix], list[list[float | None]] | None]:
    """(one K×K matrix per prompt, the pointwise scores per prompt or None for a pairwise judge)."""
    counts = counts if counts is not None else Counter()
    matrices: list[Matrix] = [[[0.5 if i == j else None for j in range(len(g))] for i in range(len(g))] for g in groups]
    scores = None
    if judge.pointwise:
        scores = score_groups(judge, prompts, groups)
        for m, s in zip(matrices, scores, strict=True):
            for i in range(len(s)):
                for j in range(len(s)):
                    if i != j:
                        m[i][j] = _from_scores(s[i], s[j], pointwise_as)
    else:
        asks = [(k, i, j) for k, g in enumerate(groups) for i in range(len(g)) for j in range(i + 1, len(g))
                if g[i] != g[j]]
        verdicts = compare_within_groups(judge, prompts, asks, groups)
        for k, g in enumerate(groups):  # identical texts: a tie, without asking
            for i in range(len(g)):
                for j in range(len(g)):
                    if i != j and g[i] == g[j]:
                        matrices[k][i][j] = 0.5
        for (k, i, j), p in zip(asks, verdicts, strict=True):
            matrices[k][i][j] = p
            matrices[k][j][i] = None if p is None else 1.0 - p
    counts["no_result"] += sum(v is None for m in matrices for row in m for v in row) // 2
    return matrices, scores


def win_rates(matrix: Matrix) -> list[float | None]:
    """P̂(y_i) = mean over j ≠ i of P[i][j], skipping verdicts that are None; None when none is left."""
    rates = []
    for i, row in enumerate(matrix):
        known = [p for j, p in enumerate(row) if j != i and p is not None]
        rates.append(sum(known) / len(known) if known else None)
    return rates
