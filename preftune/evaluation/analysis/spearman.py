"""Spearman's rank correlation: Pearson's correlation of the ranks, ties given their average rank (the
definition scipy.stats.spearmanr uses; scipy is not a dependency, so it is computed here)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; equal values share the mean of the ranks they span ([10, 20, 20] -> [1, 2.5, 2.5])."""
    data = np.asarray(values, dtype=np.float64)
    order = np.argsort(data, kind="stable")
    ranks = np.empty(len(data), dtype=np.float64)
    start = 0
    while start < len(data):
        end = start
        while end + 1 < len(data) and data[order[end + 1]] == data[order[start]]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """ρ in [-1, 1]; NaN when fewer than two values or when either side is constant (no ranking)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of the same length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan
