"""Collation: exact tensors for hand-built batches (padding values, mask positions, row order, index)."""

from __future__ import annotations

import pytest
import torch

from preftune.data import PairCollator, TokenizedExample

PAD = 99
PAIRS = [
    TokenizedExample(index=7, prompt_ids=[5, 6], chosen_ids=[7, 8, 9], rejected_ids=[10]),
    TokenizedExample(index=3, prompt_ids=[11], chosen_ids=[12], rejected_ids=[13, 14, 15, 16]),
]


def test_pairs_exact_tensors():
    """Rows: ex0 chosen (2+3=5), ex1 chosen (1+1=2), ex0 rejected (2+1=3), ex1 rejected (1+4=5); T = 5."""
    batch = PairCollator(PAD)(PAIRS)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "index"}
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool and batch["index"].dtype == torch.long
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],
        [11, 12, PAD, PAD, PAD],
        [5, 6, 10, PAD, PAD],
        [11, 13, 14, 15, 16],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
    ]
    assert batch["completion_mask"].int().tolist() == [
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 1, 1, 1, 1],
    ]
    assert batch["index"].tolist() == [7, 3]


def test_pad_to_multiple_of():
    batch = PairCollator(PAD, pad_to_multiple_of=4)(PAIRS)  # T = 5 rounds up to 8
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][1].tolist() == [11, 12] + [PAD] * 6
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 2, 3, 5]
    assert batch["completion_mask"].sum(dim=1).tolist() == [3, 1, 1, 4]
    assert not batch["completion_mask"][:, 5:].any()


def test_pad_id_equal_to_a_completion_token_is_still_masked():
    """Pad = EOS (common): the masks, not the ids, say what is padding."""
    batch = PairCollator(9)(PAIRS)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9]
    assert batch["completion_mask"][1].int().tolist() == [0, 1, 0, 0, 0]


def test_completions_exact_tensors():
    examples = [
        TokenizedExample(index=0, prompt_ids=[1, 2, 3], chosen_ids=[4], rejected_ids=None),
        TokenizedExample(index=1, prompt_ids=[1], chosen_ids=[5, 6], rejected_ids=None),
    ]
    batch = PairCollator(0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 5, 6, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["completion_mask"].int().tolist() == [[0, 0, 0, 1], [0, 1, 1, 0]]
    assert batch["index"].tolist() == [0, 1]


def test_bad_batches():
    collate = PairCollator(0)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(ValueError, match="mixes pairs and single completions"):
        collate([PAIRS[0], TokenizedExample(1, [1], [2], None)])
    with pytest.raises(ValueError, match="pad_token_id is None"):
        PairCollator(None)
