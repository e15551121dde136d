"""Response-length statistics: length bias is the first thing to rule out when a preference-trained model
"wins" (Singhal et al. 2023, "A Long Way to Go"; the reason SimPO normalises by length)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def describe(values: Sequence[float], prefix: str) -> dict[str, float]:
    """``{prefix}mean``, ``median`` and ``p90`` (numpy's linear interpolation between order statistics)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return {}
    return {f"{prefix}mean": float(data.mean()), f"{prefix}median": float(np.median(data)),
            f"{prefix}p90": float(np.percentile(data, 90))}


def length_stats(completions: Sequence[str], tokenizer=None) -> dict[str, float]:
    """Characters always; tokens (no special tokens added) when a tokenizer is given."""
    stats = {"completions": float(len(completions)), **describe([len(c) for c in completions], "chars/")}
    if tokenizer is not None and completions:
        ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        stats.update(describe([len(i) for i in ids], "tokens/"))
    return stats
