"""Collation: exact tensors for hand-built batches of every shape (padding values, mask positions, row order,
which example and slot each row holds, labels and NaN-padded scores)."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.data import Collator, PairCollator, TokenizedExample

PAD = 99
PAIRS = [
    TokenizedExample(index=7, prompt_ids=[5, 6], completions=[[7, 8, 9], [10]]),
    TokenizedExample(index=3, prompt_ids=[11], completions=[[12], [13, 14, 15, 16]]),
]
ROW_KEYS = {"input_ids", "attention_mask", "completion_mask", "index", "row_example", "row_slot", "num_slots"}


def rows(batch) -> tuple[list, list, list]:
    return batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["completion_mask"].int().tolist()


@pytest.mark.parametrize("collate", [Collator(PAD, "pairs"), PairCollator(PAD)], ids=["Collator", "PairCollator"])
def test_pairs_exact_tensors(collate):
    """Rows: ex0 chosen (2+3=5), ex1 chosen (1+1=2), ex0 rejected (2+1=3), ex1 rejected (1+4=5); T = 5."""
    batch = collate(PAIRS)
    assert set(batch) == ROW_KEYS
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool and batch["index"].dtype == torch.long
    assert rows(batch) == (
        [[5, 6, 7, 8, 9], [11, 12, PAD, PAD, PAD], [5, 6, 10, PAD, PAD], [11, 13, 14, 15, 16]],
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]],
        [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]],
    )
    assert batch["index"].tolist() == [7, 3]
    assert batch["row_example"].tolist() == [0, 1, 0, 1] and batch["row_slot"].tolist() == [0, 0, 1, 1]
    assert batch["num_slots"].dtype == torch.long and batch["num_slots"].shape == () and int(batch["num_slots"]) == 2


def test_pad_to_multiple_of():
    batch = Collator(PAD, "pairs", pad_to_multiple_of=4)(PAIRS)  # T = 5 rounds up to 8
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][1].tolist() == [11, 12] + [PAD] * 6
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 2, 3, 5]
    assert batch["completion_mask"].sum(dim=1).tolist() == [3, 1, 1, 4]
    assert not batch["completion_mask"][:, 5:].any()


def test_pad_id_equal_to_a_completion_token_is_still_masked():
    """Pad = EOS (common): the masks, not the ids, say what is padding."""
    batch = Collator(9, "pairs")(PAIRS)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9]
    assert batch["completion_mask"][1].int().tolist() == [0, 1, 0, 0, 0]


SINGLES = [TokenizedExample(0, [1, 2, 3], [[4]]), TokenizedExample(1, [1], [[5, 6]])]


@pytest.mark.parametrize("shape", ["completions", "negatives"])
def test_single_completion_shapes(shape):
    batch = Collator(0, shape)(SINGLES)
    assert set(batch) == ROW_KEYS
    assert rows(batch) == ([[1, 2, 3, 4], [1, 5, 6, 0]], [[1, 1, 1, 1], [1, 1, 1, 0]], [[0, 0, 0, 1], [0, 1, 1, 0]])
    assert batch["index"].tolist() == [0, 1]
    assert batch["row_example"].tolist() == [0, 1] and batch["row_slot"].tolist() == [0, 0]
    assert int(batch["num_slots"]) == 1


def test_pair_collator_still_takes_single_completions():
    assert rows(PairCollator(0)(SINGLES)) == rows(Collator(0, "completions")(SINGLES))


def test_unpaired_kl_rows_pair_each_prompt_with_the_next_completion():
    """Real rows: [1 2 3 4 | 5] (5), [6 | 7 8 9 10] (5), [11 12 | 13] (3); the longest is 5.
    KL rows (slot 1), prompt b + completion (b+1) % 3:
      b0: [1 2 3 4] + [7 8 9 10] cut to 5 - 4 = 1 token -> [1 2 3 4 | 7]
      b1: [6] + [13]        -> [6 | 13]
      b2: [11 12] + [5]     -> [11 12 | 5]"""
    examples = [
        TokenizedExample(0, [1, 2, 3, 4], [[5]], label=True),
        TokenizedExample(1, [6], [[7, 8, 9, 10]], label=False),
        TokenizedExample(2, [11, 12], [[13]], label=True),
    ]
    batch = Collator(PAD, "unpaired")(examples)
    assert set(batch) == ROW_KEYS | {"labels"}
    assert rows(batch) == (
        [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, PAD, PAD],
         [1, 2, 3, 4, 7], [6, 13, PAD, PAD, PAD], [11, 12, 5, PAD, PAD]],
        [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]],
        [[0, 0, 0, 0, 1], [0, 1, 1, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]],
    )
    assert batch["row_example"].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["row_slot"].tolist() == [0, 0, 0, 1, 1, 1]
    assert int(batch["num_slots"]) == 2
    assert batch["labels"].dtype == torch.bool and batch["labels"].tolist() == [True, False, True]


def test_unpaired_batch_of_one_has_no_mismatched_row():
    batch = Collator(PAD, "unpaired")([TokenizedExample(5, [1], [[2, 3]], label=False)])
    assert batch["input_ids"].tolist() == [[1, 2, 3]]
    assert batch["row_slot"].tolist() == [0] and int(batch["num_slots"]) == 1
    assert batch["labels"].tolist() == [False]


def test_ranked_lists_of_different_lengths():
    """ex0 has 3 completions, ex1 has 2: K = 3 and ex1 has no slot-2 row. Slot-major rows:
    ex0/0 [1 | 2], ex1/0 [6 7 | 8], ex0/1 [1 | 3 4], ex1/1 [6 7 | 9], ex0/2 [1 | 5]; T = 3."""
    examples = [
        TokenizedExample(4, [1], [[2], [3, 4], [5]], scores=[3.0, 2.0, -1.0]),
        TokenizedExample(9, [6, 7], [[8], [9]], scores=[0.5, 0.5]),
    ]
    batch = Collator(PAD, "ranked")(examples)
    assert set(batch) == ROW_KEYS | {"scores"}
    assert rows(batch) == (
        [[1, 2, PAD], [6, 7, 8], [1, 3, 4], [6, 7, 9], [1, 5, PAD]],
        [[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]],
        [[0, 1, 0], [0, 0, 1], [0, 1, 1], [0, 0, 1], [0, 1, 0]],
    )
    assert batch["index"].tolist() == [4, 9]
    assert batch["row_example"].tolist() == [0, 1, 0, 1, 0] and batch["row_slot"].tolist() == [0, 0, 1, 1, 2]
    assert int(batch["num_slots"]) == 3
    scores = batch["scores"]
    assert scores.dtype == torch.float32 and scores.shape == (2, 3)
    assert scores[0].tolist() == [3.0, 2.0, -1.0] and scores[1, :2].tolist() == [0.5, 0.5]
    assert math.isnan(scores[1, 2])


def test_scored_scores_are_one_column():
    examples = [TokenizedExample(0, [1], [[2]], scores=[0.25]), TokenizedExample(1, [3], [[4, 5]], scores=[-2.0])]
    batch = Collator(PAD, "scored")(examples)
    assert batch["input_ids"].tolist() == [[1, 2, PAD], [3, 4, 5]]
    assert batch["scores"].tolist() == [[0.25], [-2.0]] and int(batch["num_slots"]) == 1


def test_negatives_with_samples_rejected_first_then_samples():
    """ex0: rejected [2], samples [3], [4]; ex1: rejected [6], sample [7]."""
    examples = [TokenizedExample(0, [1], [[2], [3], [4]]), TokenizedExample(1, [5], [[6], [7]])]
    batch = Collator(PAD, "negatives_with_samples")(examples)
    assert set(batch) == ROW_KEYS
    assert batch["input_ids"].tolist() == [[1, 2], [5, 6], [1, 3], [5, 7], [1, 4]]
    assert batch["completion_mask"].int().tolist() == [[0, 1]] * 5
    assert batch["row_example"].tolist() == [0, 1, 0, 1, 0] and batch["row_slot"].tolist() == [0, 0, 1, 1, 2]
    assert int(batch["num_slots"]) == 3


def test_bad_batches():
    with pytest.raises(ValueError, match="empty batch"):
        Collator(0, "pairs")([])
    with pytest.raises(ValueError, match="mixes pairs and single completions"):
        PairCollator(0)([PAIRS[0], TokenizedExample(1, [1], [[2]])])
    with pytest.raises(ValueError, match="example 1: pairs data has 2 completions per example, got 1"):
        Collator(0, "pairs")([PAIRS[0], TokenizedExample(1, [1], [[2]])])
    with pytest.raises(ValueError, match="example 3: ranked data has at least 2 completions per example, got 1"):
        Collator(0, "ranked")([TokenizedExample(3, [1], [[2]], scores=[1.0])])
    with pytest.raises(ValueError, match="example 0: unpaired data needs a label"):
        Collator(0, "unpaired")([TokenizedExample(0, [1], [[2]])])
    with pytest.raises(ValueError, match=r"example 0: ranked data needs one score per completion \(2\), got \[1.0\]"):
        Collator(0, "ranked")([TokenizedExample(0, [1], [[2], [3]], scores=[1.0])])
    with pytest.raises(ValueError, match="pad_token_id is None"):
        PairCollator(None)
    with pytest.raises(ValueError, match="shape must be one of pairs, completions"):
        Collator(0, "triples")
