"""Tokenized examples -> a right-padded batch with a mask of the positions that hold completion tokens.

Chosen and rejected sequences are stacked into one batch (chosen rows first) so that both go through
the model in a single forward; the loss reads only the positions ``completion_mask`` marks.
"""

from __future__ import annotations

import torch

from .tokenize import TokenizedExample


class PairCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token (its EOS works: padding is masked)")
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        """Pairs -> ``input_ids`` (2B, T) long, ``attention_mask`` (2B, T) long, ``completion_mask`` (2B, T)
        bool, ``index`` (B,) long. Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, in the
        examples' order. Completions (``rejected_ids is None``) -> the same keys with B rows."""
        if not examples:
            raise ValueError("cannot collate an empty batch")
        paired = [e.rejected_ids is not None for e in examples]
        if any(paired) and not all(paired):
            raise ValueError("a batch mixes pairs and single completions; collate them separately")
        completions = [e.chosen_ids for e in examples]
        prompts = [e.prompt_ids for e in examples]
        if all(paired):
            completions += [e.rejected_ids for e in examples]
            prompts += prompts
        return {
            **self._pad(prompts, completions),
            "index": torch.tensor([e.index for e in examples], dtype=torch.long),
        }

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
