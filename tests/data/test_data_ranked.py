"""Ranked lists -> pairs: exact pairs for each mode, ties skipped and counted, lists with no pair named."""

from __future__ import annotations

import pytest

from preftune.data import PairExample, RankedExample, pair_positions, ranked_to_pairs


@pytest.mark.parametrize(
    "mode, expected",
    [
        # scores [3, 1, 2]: best-first order is 0 (3), 2 (2), 1 (1)
        ("all_pairs", [(0, 2), (0, 1), (2, 1)]),
        ("best_vs_worst", [(0, 1)]),
        ("best_vs_each", [(0, 2), (0, 1)]),
    ],
)
def test_pairs_by_mode(mode, expected):
    assert pair_positions([3.0, 1.0, 2.0], mode) == (expected, 0)


def test_ties_are_skipped_and_counted():
    """scores [2, 5, 2, 1]: order 1, 0, 2, 3 (0 before 2: stable). all_pairs candidates
    (1,0) (1,2) (1,3) (0,2)* (0,3) (2,3): one tie (0,2) skipped."""
    assert pair_positions([2.0, 5.0, 2.0, 1.0], "all_pairs") == ([(1, 0), (1, 2), (1, 3), (0, 3), (2, 3)], 1)
    # best (1) against each: no tie; best vs worst (1, 3)
    assert pair_positions([2.0, 5.0, 2.0, 1.0], "best_vs_each") == ([(1, 0), (1, 2), (1, 3)], 0)
    # a tie at the top: [4, 4, 1] best is 0 (stable); (0, 1) tied
    assert pair_positions([4.0, 4.0, 1.0], "best_vs_each") == ([(0, 2)], 1)
    assert pair_positions([4.0, 4.0], "best_vs_worst") == ([], 1)


def test_unknown_mode():
    with pytest.raises(ValueError, match="data.ranked_to_pairs must be one of all_pairs, best_vs_worst, best_vs_each"):
        pair_positions([1.0, 2.0], "every_pair")


def test_ranked_to_pairs_examples_sources_and_summary():
    lists = [
        RankedExample("train.jsonl:1", "p1", ["a", "b", "c"], [3.0, 1.0, 2.0]),
        RankedExample("train.jsonl:2", "p2", ["x", "y"], [-1.0, -1.0]),  # all tied: no pair
        RankedExample("train.jsonl:3", "p3", ["u", "v", "w"], [0.0, 0.0, 1.0]),
    ]
    pairs, summary = ranked_to_pairs(lists, "all_pairs")
    assert pairs == [
        PairExample("train.jsonl:1 (completions 1 > 3)", "p1", "a", "c"),
        PairExample("train.jsonl:1 (completions 1 > 2)", "p1", "a", "b"),
        PairExample("train.jsonl:1 (completions 3 > 2)", "p1", "c", "b"),
        PairExample("train.jsonl:3 (completions 3 > 1)", "p3", "w", "u"),
        PairExample("train.jsonl:3 (completions 3 > 2)", "p3", "w", "v"),
    ]
    # tied: (x, y) in list 2, (u, v) in list 3
    assert (summary.lists, summary.pairs, summary.tied, summary.without_pairs) == (3, 5, 2, ["train.jsonl:2"])
    assert summary.describe() == (
        "ranked lists -> pairs (data.ranked_to_pairs=all_pairs): 3 lists gave 5 pairs, 2 pairs with tied scores "
        "skipped, 1 list gave no pair (all scores tied): train.jsonl:2"
    )
