"""The tokenized example every data shape becomes, and the content hash that keys caches built from it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass
class TokenizedExample:
    index: int  # position of the example in its split (as validated, before any drop): a stable cache key
    prompt_ids: list[int]
    # Slot order by shape: pairs [chosen, rejected]; completions / unpaired / scored [completion];
    # negatives [rejected]; ranked [best, ..., worst]; negatives_with_samples [rejected, sample_1..sample_K].
    completions: list[list[int]]
    label: bool | None = None  # unpaired: True = desirable
    scores: list[float] | None = None  # scored: [score]; ranked: one per completion, best first

    @property
    def chosen_ids(self) -> list[int]:
        """The first completion (the chosen one of a pair), for readability in pair code."""
        return self.completions[0]

    @property
    def rejected_ids(self) -> list[int] | None:
        """The second completion (the rejected one of a pair), None when there is only one."""
        return self.completions[1] if len(self.completions) >= 2 else None


def content_hash(tokenized: list[TokenizedExample]) -> str:
    """sha256 hex over every index, id, label and score: the key of cached reference log-probs for exactly
    this data (so relabelling or rescoring a row, not only retokenizing it, gives another key)."""
    digest = hashlib.sha256(b"preftune-tokenized-v2")
    for example in tokenized:
        label = -1 if example.label is None else int(example.label)
        scores = example.scores
        # lengths first: ([1], [2 3]) != ([1 2], [3]); -1 marks an absent label / score list
        header = [example.index, len(example.prompt_ids), len(example.completions),
                  *(len(c) for c in example.completions), label, -1 if scores is None else len(scores)]
        digest.update(np.asarray(header, dtype="<i8").tobytes())
        for ids in (example.prompt_ids, *example.completions):
            digest.update(np.asarray(ids, dtype="<i8").tobytes())
        if scores:
            digest.update(np.asarray(scores, dtype="<f8").tobytes())
    return digest.hexdigest()
