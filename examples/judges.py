"""Judge functions for `judge: {type: function, function: examples/judges.py:NAME}` (see configs/label.yaml).

A judge function takes (completion) or (prompt, completion) and returns a number, higher is better; anything
that is not a number is counted as unparsable. These are small and dependency-free, to try the pipeline.
"""

from __future__ import annotations

import re

POSITIVE = {"good", "great", "excellent", "wonderful", "best", "love", "loved", "enjoyable", "beautiful", "funny",
            "brilliant", "moving", "fresh", "charming", "delightful", "superb", "fine", "solid", "smart", "fun"}
NEGATIVE = {"bad", "worst", "boring", "dull", "awful", "terrible", "mess", "poor", "stupid", "waste", "tedious",
            "bland", "lame", "predictable", "flat", "fails", "weak", "ugly", "annoying", "pointless"}


def positivity(completion: str) -> float:
    """Positive minus negative words per word (a crude sentiment lexicon, in [-1, 1]; 0 for an empty text)."""
    words = re.findall(r"[a-z']+", completion.lower())
    if not words:
        return 0.0
    return (sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)) / len(words)


def shorter_is_better(completion: str) -> float:
    """Minus the length in characters: a judge that prefers brevity."""
    return -float(len(completion))
