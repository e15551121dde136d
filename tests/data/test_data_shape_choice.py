"""Which shape a file holds: detection from its rows' columns, the error when the objective takes another
shape, ranked lists turned into pairs through load_examples, and DataSplits.shape."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from preftune.config import DataConfig
from preftune.data import DataValidationError, PairExample, RankedExample, load_examples

ROWS = {
    "pairs": {"prompt": "p", "chosen": "c", "rejected": "r"},
    "completions": {"prompt": "p", "completion": "c"},
    "unpaired": {"prompt": "p", "completion": "c", "label": True},
    "scored": {"prompt": "p", "completion": "c", "score": 1.5},
    "negatives": {"prompt": "p", "rejected": "r"},
    "negatives_with_samples": {"prompt": "p", "rejected": "r", "samples": ["s"]},
    "ranked": {"prompt": "p", "completions": ["a", "b"], "ranks": [2, 1]},
}
# A stand-in objectives table, so the expected messages do not change when objectives are added.
TABLE = {
    "dpo": SimpleNamespace(shapes=("pairs",)),
    "ipo": SimpleNamespace(shapes=("pairs",)),
    "sft": SimpleNamespace(shapes=("pairs", "completions")),
    "kto": SimpleNamespace(shapes=("unpaired",)),
    "plackett_luce": SimpleNamespace(shapes=("ranked",)),
}


@pytest.fixture(autouse=True)
def table(monkeypatch):
    monkeypatch.setattr("preftune.objectives.table.OBJECTIVES", TABLE)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def error(path, shape, objective=None, **config) -> str:
    with pytest.raises(DataValidationError) as info:
        load_examples(DataConfig(train_file=path, **config), shape, objective=objective)
    return str(info.value)


@pytest.mark.parametrize("shape", list(ROWS))
def test_each_shape_is_detected_and_returned(tmp_path, shape):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[shape]] * 2)
    accepted = tuple(s for s in ROWS if s != "pairs") + ("pairs",)  # every shape, pairs last
    assert load_examples(DataConfig(train_file=path), accepted).shape == shape


def test_dpo_on_unpaired_data(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS["unpaired"]])
    assert error(path, ("pairs",), "dpo") == (
        f"{path}: objective 'dpo' takes pairs (prompt, chosen, rejected) [or ranked lists with "
        "data.ranked_to_pairs]; the rows have prompt, completion, label, which is unpaired data (objectives: kto)"
    )


def test_objective_with_two_shapes_on_scored_data(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS["scored"]])
    assert error(path, ("pairs", "completions"), "sft") == (
        f"{path}: objective 'sft' takes pairs (prompt, chosen, rejected) or completions (prompt and completion, or "
        "messages) [or ranked lists with data.ranked_to_pairs]; the rows have prompt, completion, score, which is "
        "scored data (no objective in the table takes it)"
    )


def test_kto_on_pairs_names_the_pair_objectives_and_mapped_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"q": "p", "chosen": "c", "rejected": "r"}])
    assert error(path, "unpaired", "kto", columns={"prompt": "q"}) == (
        f"{path}: objective 'kto' takes unpaired (prompt, completion, label); the rows have prompt (column 'q'), "
        "chosen, rejected, which is preference pairs (objectives: dpo, ipo, sft)"
    )


def test_ranked_lists_for_a_pair_objective_without_ranked_to_pairs(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS["ranked"]])
    assert error(path, ("pairs",)) == (
        f"{path}: the objective takes pairs (prompt, chosen, rejected) [or ranked lists with data.ranked_to_pairs]; "
        "the rows have prompt, completions, ranks, which is ranked lists (objectives: plackett_luce; or any "
        "objective on pairs, with data.ranked_to_pairs); to train on pairs drawn from each list, set "
        "data.ranked_to_pairs to all_pairs, best_vs_worst or best_vs_each"
    )


def test_the_shape_most_rows_describe_wins_over_a_broken_first_row(tmp_path):
    """Line 1 lacks 'chosen' (its columns say negatives); lines 2-3 are pairs: the file holds pairs and line 1
    gets its own error, not a shape mismatch."""
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "rejected": "r"}, ROWS["pairs"], ROWS["pairs"]])
    message = error(path, "pairs")
    assert message.startswith("1 of 3 rows are invalid")
    assert "train.jsonl:1: field 'chosen': missing" in message


@pytest.mark.parametrize("accepted, expected", [(("pairs",), "pairs"), (("ranked",), "ranked")])
def test_a_row_with_the_columns_of_two_shapes_is_read_as_the_accepted_one(tmp_path, accepted, expected):
    row = {**ROWS["pairs"], "completions": ["x", "y"], "scores": [1, 0]}  # pairs derived from a ranked list
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    assert load_examples(DataConfig(train_file=path), accepted).shape == expected


def test_a_label_column_is_never_dropped_silently(tmp_path):
    """An objective on single completions must not train on undesirable ones: unpaired data is an error."""
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS["unpaired"]])
    assert "which is unpaired data (objectives: kto)" in error(path, ("pairs", "completions"), "sft")


def test_rows_of_no_known_shape_are_checked_as_the_first_accepted_shape(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["{oops", {"text": "x"}])
    message = error(path, ("unpaired", "pairs"))
    assert "train.jsonl:1: not valid JSON" in message
    assert "train.jsonl:2: field 'label': missing" in message


def test_held_out_file_of_another_shape(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [ROWS["pairs"]])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [ROWS["negatives"]])
    assert error(train, "pairs", eval_file=held_out) == (
        f"{held_out}: the rows are negatives data but {train} holds pairs data; the train and held-out files must "
        "have the same shape"
    )


def test_ranked_to_pairs_through_load_examples(tmp_path, caplog):
    rows = [
        {"prompt": "p1", "completions": ["a", "b", "c"], "scores": [3, 1, 2]},
        {"prompt": "p2", "completions": ["x", "y"], "scores": [0, 0]},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="preftune"):
        splits = load_examples(DataConfig(train_file=path, ranked_to_pairs="best_vs_each"), ("pairs",))
    assert splits.shape == "pairs"
    # scores [3, 1, 2]: best is item 1; best_vs_each gives (1, 3), (1, 2)
    assert splits.train == [
        PairExample("train.jsonl:1 (completions 1 > 3)", "p1", "a", "c"),
        PairExample("train.jsonl:1 (completions 1 > 2)", "p1", "a", "b"),
    ]
    line = ("train: ranked lists -> pairs (data.ranked_to_pairs=best_vs_each): 2 lists gave 2 pairs, 1 pair with "
            "tied scores skipped, 1 list gave no pair (all scores tied): train.jsonl:2")
    assert splits.summaries == [line] and line in caplog.text


def test_ranked_lists_stay_lists_for_an_objective_taking_them(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS["ranked"]])
    splits = load_examples(DataConfig(train_file=path), ("pairs", "ranked"))
    assert splits.shape == "ranked" and splits.summaries == []
    assert splits.train == [RankedExample("train.jsonl:1", "p", ["a", "b"], [-2.0, -1.0])]


def test_held_out_lists_are_split_off_before_pairing(tmp_path):
    rows = [{"prompt": f"p{i}", "completions": ["a", "b", "c"], "scores": [1, 2, 3]} for i in range(4)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    splits = load_examples(DataConfig(train_file=path, ranked_to_pairs="all_pairs", eval_fraction=0.25), "pairs")
    assert (len(splits.train), len(splits.eval)) == (9, 3)  # 3 lists x 3 pairs, 1 list x 3 pairs
    assert not {e.prompt for e in splits.train} & {e.prompt for e in splits.eval}
    assert [line.split(":")[0] for line in splits.summaries] == ["train", "eval"]


def test_every_list_tied_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completions": ["a", "b"], "scores": [1, 1]}])
    assert error(path, "pairs", ranked_to_pairs="best_vs_worst") == (
        f"{path}: data.ranked_to_pairs=best_vs_worst gave no pairs: every list's scores are tied"
    )


def test_ranked_to_pairs_on_pairs_data_is_ignored_with_a_warning(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS["pairs"]])
    with caplog.at_level(logging.WARNING, logger="preftune"):
        splits = load_examples(DataConfig(train_file=path, ranked_to_pairs="all_pairs"), "pairs")
    assert splits.shape == "pairs" and len(splits.train) == 1
    assert f"data.ranked_to_pairs=all_pairs is ignored: {path} holds pairs data, not ranked lists" in caplog.text


def test_bad_shape_argument():
    with pytest.raises(ValueError, match=r"shape must be one of pairs, completions, unpaired, scored, negatives, "
                                         r"negatives_with_samples, ranked \(or a tuple of them\), got \('pair',\)"):
        load_examples(DataConfig(train_file="x.jsonl"), ("pair",))
