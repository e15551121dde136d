"""Tokenized examples of one data shape -> a right-padded batch, one row per (example, completion slot).

Rows are slot-major: every example's slot-0 row (in batch order), then every slot-1 row, and so on, so that
all completions go through the model in one forward and pairs keep their layout (rows 0..B-1 chosen,
B..2B-1 rejected). ``row_example`` / ``row_slot`` say where each row belongs, so that objectives on lists
of any length can scatter the rows' log-probs into ``(B, K)``. The loss reads only ``completion_mask``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .tokenized import TokenizedExample

# (fewest, most) completions per example; None: no upper bound.
SLOT_COUNTS = {
    "pairs": (2, 2), "completions": (1, 1), "unpaired": (1, 1), "scored": (1, 1), "negatives": (1, 1),
    "ranked": (2, None), "negatives_with_samples": (2, None),
}


def _check(examples: list[TokenizedExample], shape: str) -> None:
    fewest, most = SLOT_COUNTS[shape]
    for e in examples:
        n = len(e.completions)
        if n < fewest or (most is not None and n > most):
            wanted = str(fewest) if fewest == most else f"at least {fewest}"
            raise ValueError(f"example {e.index}: {shape} data has {wanted} completions per example, got {n}")
        if shape == "unpaired" and e.label is None:
            raise ValueError(f"example {e.index}: unpaired data needs a label, got None")
        if shape in ("scored", "ranked") and (e.scores is None or len(e.scores) != n):
            raise ValueError(f"example {e.index}: {shape} data needs one score per completion ({n}), got {e.scores}")


class Collator:
    def __init__(self, pad_token_id: int, shape: str, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token (its EOS works: padding is masked)")
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        if shape not in SLOT_COUNTS:
            raise ValueError(f"shape must be one of {', '.join(SLOT_COUNTS)}, got {shape!r}")
        self.pad_token_id, self.shape, self.pad_to_multiple_of = pad_token_id, shape, pad_to_multiple_of

    def _shape_of(self, examples: list[TokenizedExample]) -> str:
        return self.shape

    def __call__(self, examples: list[TokenizedExample],
                 context: list[TokenizedExample] | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` (N, T) long, ``attention_mask`` (N, T) long, ``completion_mask`` (N, T) bool, right
        padding; ``index`` (B,) long; ``row_example`` (N,) long and ``row_slot`` (N,) long: the example and
        slot of each row; ``num_slots`` 0-d long K, the most slots any example has. An example with fewer
        than K completions has no row for its missing slots.

        unpaired: slot 1 holds the mismatched rows KTO (Ethayarajh et al. 2024) estimates its KL reference
        point from: the prompt of example b with the completion of example (b+1) % B, cut so that no such
        row is longer than the batch's longest real row; with B == 1 there is none and K is 1.
        ``labels`` (B,) bool. ``context``: the global micro-batch that ``examples`` (one process's share of it)
        belongs to; the mismatched rows are then those one process collating ``context`` would build.
        scored / ranked: ``scores`` (B, K) float32, NaN where an example has no completion.
        """
        if not examples:
            raise ValueError("cannot collate an empty batch")
        shape = self._shape_of(examples)
        _check(examples, shape)
        slots = [list(e.completions) for e in examples]
        if shape == "unpaired":
            slots = _with_mismatched(examples, context or examples)
        num_slots = max(len(s) for s in slots)
        rows = [(b, s) for s in range(num_slots) for b in range(len(examples)) if s < len(slots[b])]
        batch = {
            **self._pad([examples[b].prompt_ids for b, _ in rows], [slots[b][s] for b, s in rows]),
            "index": torch.tensor([e.index for e in examples], dtype=torch.long),
            "row_example": torch.tensor([b for b, _ in rows], dtype=torch.long),
            "row_slot": torch.tensor([s for _, s in rows], dtype=torch.long),
            "num_slots": torch.tensor(num_slots, dtype=torch.long),
        }
        if shape == "unpaired":
            batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
        if shape in ("scored", "ranked"):
            scores = torch.full((len(examples), num_slots), float("nan"), dtype=torch.float32)
            for b, e in enumerate(examples):
                scores[b, : len(e.scores)] = torch.tensor(e.scores, dtype=torch.float32)
            batch["scores"] = scores
        return batch

    def _pad(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        rows = len(prompts)
        input_ids = torch.full((rows, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, length), dtype=torch.long)
        completion_mask = torch.zeros((rows, length), dtype=torch.bool)
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            end = len(prompt) + len(completion)
            input_ids[row, :end] = torch.tensor(prompt + completion, dtype=torch.long)
            attention_mask[row, :end] = 1
            completion_mask[row, len(prompt) : end] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _with_mismatched(examples: list[TokenizedExample], context: list[TokenizedExample]) -> list[list[list[int]]]:
    """[own completion, completion of the example after it in ``context``] per example. The borrowed
    completion is cut to fit the longest real row of ``context``, so the KL rows never make the batch longer
    (or use more memory) than it was."""
    if len(context) == 1:
        return [list(e.completions) for e in examples]
    longest = max(len(e.prompt_ids) + len(e.completions[0]) for e in context)
    place = {id(e): j for j, e in enumerate(context)}
    following = [context[(place[id(e)] + 1) % len(context)] for e in examples]
    return [[e.completions[0], after.completions[0][: longest - len(e.prompt_ids)]]
            for e, after in zip(examples, following, strict=True)]


def row_layout(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, int]:
    """(example (N,), slot (N,), number of slots K) of every row of a collated batch. A batch built by hand
    without ``row_example`` is read as the pair layout: slot k of all B examples together, slot-major."""
    if "row_example" in batch:
        return batch["row_example"], batch["row_slot"], int(batch["num_slots"])
    n_rows, n_examples = batch["input_ids"].shape[0], batch["index"].shape[0]
    rows = torch.arange(n_rows, device=batch["input_ids"].device)
    return rows % n_examples, rows // n_examples, n_rows // n_examples


def batches(examples: list[TokenizedExample], positions: list[list[int]], collator: Collator,
            device: torch.device) -> Iterator[dict[str, Tensor]]:
    """Collated batches of ``examples`` (one per list of positions), moved to ``device``."""
    for group in positions:
        yield {k: v.to(device) for k, v in collator([examples[i] for i in group]).items()}


class PairCollator(Collator):
    """``Collator(pad_token_id, "pairs")`` that also takes a batch of single completions (SFT), as the
    collator before ``Collator`` did; kept until its callers name their shape."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        super().__init__(pad_token_id, "pairs", pad_to_multiple_of)

    def _shape_of(self, examples: list[TokenizedExample]) -> str:
        counts = {len(e.completions) for e in examples}
        if counts == {1}:
            return "completions"
        if 1 in counts:
            raise ValueError("a batch mixes pairs and single completions; collate them separately")
        return "pairs"
