"""Validation of the shapes that are not pairs (unpaired, scored, negatives, negatives with samples, ranked):
one test per kind of bad input, checking file, line, field and what was expected; and what valid rows become."""

from __future__ import annotations

import json

import pytest

from preftune.config import DataConfig
from preftune.data import (
    DataValidationError,
    NegativeExample,
    NegativesWithSamplesExample,
    RankedExample,
    ScoredExample,
    UnpairedExample,
    load_examples,
)

GOOD = {
    "unpaired": {"prompt": "p", "completion": "c", "label": True},
    "scored": {"prompt": "p", "completion": "c", "score": 0.5},
    "negatives": {"prompt": "p", "rejected": "r"},
    "negatives_with_samples": {"prompt": "p", "rejected": "r", "samples": ["s1", "s2"]},
    "ranked": {"prompt": "p", "completions": ["a", "b"], "scores": [1, 2]},
}
LABEL = "expected true or false (JSON booleans) or 1 or 0, where true = desirable"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def problems(tmp_path, shape, *rows, **config) -> str:
    """The error for a train.jsonl whose line 1 is a valid ``shape`` row and lines 2.. are ``rows``."""
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD[shape], *rows])
    with pytest.raises(DataValidationError) as info:
        load_examples(DataConfig(train_file=str(path), **config), shape)
    return str(info.value)


def load_one(tmp_path, shape, row, **config):
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    splits = load_examples(DataConfig(train_file=str(path), **config), shape)
    assert splits.shape == shape
    return splits.train[0]


# ------------------------------------------------------------------ unpaired (KTO)


@pytest.mark.parametrize(
    "label, shown",
    [("true", "'true'"), ("desirable", "'desirable'"), (2, "2 (a number)"), (1.0, "1.0 (a number)"), (None, "null")],
)
def test_unpaired_label_must_be_a_boolean_or_0_1(tmp_path, label, shown):
    message = problems(tmp_path, "unpaired", {"prompt": "p", "completion": "c", "label": label})
    assert f"train.jsonl:2: field 'label': {LABEL}, got {shown}" in message


def test_unpaired_missing_label(tmp_path):
    message = problems(tmp_path, "unpaired", {"prompt": "p", "completion": "c", "is_good": True})
    assert f"train.jsonl:2: field 'label': missing ({LABEL}); the row has fields 'prompt', 'completion', 'is_good'" in message


def test_unpaired_missing_or_empty_completion(tmp_path):
    message = problems(tmp_path, "unpaired", {"prompt": "p", "label": 1}, {"prompt": "p", "completion": " ", "label": 0})
    assert "train.jsonl:2: field 'completion': missing (expected a non-empty string or a list of messages)" in message
    assert "train.jsonl:3: field 'completion': expected a non-empty string or a list of messages, got ' '" in message


def test_unpaired_mixed_formats(tmp_path):
    message = problems(tmp_path, "unpaired", {"prompt": "p", "completion": [assistant("c")], "label": True})
    assert ("train.jsonl:2: mixed formats: 'prompt' is text, 'completion' is a list of messages; expected prompt "
            "and completion all as text, or all as lists of messages") in message


def test_unpaired_every_problem_of_a_row_is_reported(tmp_path):
    message = problems(tmp_path, "unpaired", {"prompt": "p", "completion": [assistant("c")], "label": "yes"})
    assert f"train.jsonl:2: field 'label': {LABEL}, got 'yes'" in message
    assert "train.jsonl:2: mixed formats: 'prompt' is text, 'completion' is a list of messages" in message


def test_unpaired_conversation_not_ending_with_the_assistant(tmp_path):
    row = {"prompt": [user("hi")], "completion": [assistant("a"), user("?")], "label": False}
    message = problems(tmp_path, "unpaired", row)
    assert ("train.jsonl:2: field 'completion': the conversation must end with an assistant message, but its last "
            "message has role 'user'") in message


@pytest.mark.parametrize("label, expected", [(True, True), (False, False), (1, True), (0, False)])
def test_unpaired_valid_labels(tmp_path, label, expected):
    example = load_one(tmp_path, "unpaired", {"prompt": "p", "completion": "c", "label": label})
    assert example == UnpairedExample("train.jsonl:1", "p", "c", expected)


def test_unpaired_conversation_repeating_the_prompt_is_cut_after_it(tmp_path):
    row = {"prompt": [user("hi")], "completion": [user("hi"), assistant("yo")], "label": True}
    assert load_one(tmp_path, "unpaired", row) == UnpairedExample("train.jsonl:1", [user("hi")], [assistant("yo")], True)


def test_unpaired_text_wrapped_for_the_chat_template(tmp_path):
    example = load_one(tmp_path, "unpaired", GOOD["unpaired"], chat_template=True)
    assert example == UnpairedExample("train.jsonl:1", [user("p")], [assistant("c")], True)


# ------------------------------------------------------------------ scored (DRO)


@pytest.mark.parametrize(
    "score, shown",
    [("0.5", "'0.5'"), (True, "true (a boolean)"), (float("nan"), "nan (a number)"),
     (float("inf"), "inf (a number)"), ([1], "a list [1]"), (None, "null")],
)
def test_scored_score_must_be_a_finite_number(tmp_path, score, shown):
    message = problems(tmp_path, "scored", {"prompt": "p", "completion": "c", "score": score})
    assert f"train.jsonl:2: field 'score': expected a finite number, got {shown}" in message


def test_scored_missing_score_and_prompt(tmp_path):
    message = problems(tmp_path, "scored", {"completion": "c", "score_x": 1})
    assert "train.jsonl:2: field 'score': missing (expected a finite number); the row has fields 'completion'" in message
    assert "train.jsonl:2: field 'prompt': missing (expected a non-empty string or a list of messages)" in message


def test_scored_valid_int_score_becomes_float(tmp_path):
    example = load_one(tmp_path, "scored", {"prompt": "p", "completion": "c", "score": -3})
    assert example == ScoredExample("train.jsonl:1", "p", "c", -3.0) and isinstance(example.score, float)


# ------------------------------------------------------------------ negatives (NPO)


def test_negatives_missing_and_wrong_type(tmp_path):
    message = problems(tmp_path, "negatives", {"prompt": "p", "bad": "r"}, {"prompt": "p", "rejected": 5})
    assert "train.jsonl:2: field 'rejected': missing (expected a non-empty string or a list of messages); " in message
    assert "train.jsonl:3: field 'rejected': expected a non-empty string or a list of messages, got 5 (a number)" in message


def test_negatives_messages_with_chat_template_false(tmp_path):
    message = problems(tmp_path, "negatives", {"prompt": [user("hi")], "rejected": [assistant("no")]}, chat_template=False)
    assert ("train.jsonl:2: field 'prompt': a list of messages needs the chat template, but data.chat_template is "
            "false") in message


def test_negatives_valid(tmp_path):
    assert load_one(tmp_path, "negatives", GOOD["negatives"]) == NegativeExample("train.jsonl:1", "p", "r")


# ------------------------------------------------------------------ negatives with samples (D²O)

SAMPLES = "a list of at least 1 completions sampled from the starting model, each a non-empty string or a list of messages"


@pytest.mark.parametrize(
    "samples, shown", [([], "a list of 0 []"), ("s1", "'s1'"), (None, "null")],
)
def test_samples_must_be_a_non_empty_list(tmp_path, samples, shown):
    message = problems(tmp_path, "negatives_with_samples", {"prompt": "p", "rejected": "r", "samples": samples})
    assert f"train.jsonl:2: field 'samples': expected {SAMPLES}, got {shown}" in message


def test_samples_missing(tmp_path):
    message = problems(tmp_path, "negatives_with_samples", {"prompt": "p", "rejected": "r", "sample": ["x"]})
    assert f"train.jsonl:2: field 'samples': missing (expected {SAMPLES}); the row has fields" in message


def test_sample_items_are_checked_one_by_one(tmp_path):
    row = {"prompt": [user("q")], "rejected": [assistant("r")], "samples": [[assistant("a")], "", [{"content": "x"}]]}
    message = problems(tmp_path, "negatives_with_samples", row)
    assert "train.jsonl:2: field 'samples' item 2: expected a non-empty string or a list of messages, got ''" in message
    assert "train.jsonl:2: message 1 of 'samples' item 3 has no 'role'; expected one of system, user" in message


def test_samples_mixed_with_text(tmp_path):
    row = {"prompt": "q", "rejected": "r", "samples": ["a", [assistant("b")]]}
    message = problems(tmp_path, "negatives_with_samples", row)
    assert ("train.jsonl:2: mixed formats: 'prompt' is text, 'rejected' is text, 'samples' item 1 is text, 'samples' "
            "item 2 is a list of messages; expected prompt, rejected and samples all as text, or all as lists of "
            "messages") in message


def test_negatives_with_samples_valid_and_conversational(tmp_path):
    row = {"prompt": [user("q")], "rejected": [assistant("r")], "samples": [[assistant("a")], [assistant("a")]]}
    example = load_one(tmp_path, "negatives_with_samples", row)  # samples may repeat: sampling does
    assert example == NegativesWithSamplesExample("train.jsonl:1", [user("q")], [assistant("r")],
                                                  [[assistant("a")], [assistant("a")]])
    assert example.slots == [[assistant("r")], [assistant("a")], [assistant("a")]]


# ------------------------------------------------------------------ ranked lists

COMPLETIONS = "a list of at least 2 completions, each a non-empty string or a list of messages"


@pytest.mark.parametrize(
    "completions, shown", [(["only"], 'a list of 1 ["only"]'), ("a", "'a'"), ({"a": 1}, 'an object {"a": 1}')],
)
def test_ranked_completions_must_be_a_list_of_two_or_more(tmp_path, completions, shown):
    message = problems(tmp_path, "ranked", {"prompt": "p", "completions": completions, "ranks": [1, 2]})
    assert f"train.jsonl:2: field 'completions': expected {COMPLETIONS}, got {shown}" in message


def test_ranked_bad_item(tmp_path):
    message = problems(tmp_path, "ranked", {"prompt": "p", "completions": ["a", 7, "c"], "scores": [1, 2, 3]})
    assert "train.jsonl:2: field 'completions' item 2: expected a non-empty string or a list of messages, got 7" in message


def test_ranked_identical_completions(tmp_path):
    message = problems(tmp_path, "ranked", {"prompt": "p", "completions": ["a", "b", "a"], "scores": [1, 2, 3]})
    assert "train.jsonl:2: field 'completions': items 1 and 3 are identical; a ranking needs different completions" in message


def test_ranked_scores_length_and_items(tmp_path):
    message = problems(
        tmp_path, "ranked",
        {"prompt": "p", "completions": ["a", "b", "c"], "scores": [1, 2]},
        {"prompt": "p", "completions": ["a", "b"], "scores": [1, "2"]},
    )
    assert ("train.jsonl:2: field 'scores': expected a list of 3 finite numbers (one per completion, higher = "
            "better), got a list [1, 2]") in message
    assert "train.jsonl:3: field 'scores' item 2: expected a finite number, got '2'" in message


@pytest.mark.parametrize(
    "ranks, shown", [([1, 1, 2], "a list [1, 1, 2]"), ([0, 1, 2], "a list [0, 1, 2]"), ([1, 2], "a list [1, 2]"),
                     ([1, 2.0, 3], "a list [1, 2.0, 3]"), ([True, 2, 3], "a list [true, 2, 3]")],
)
def test_ranked_ranks_must_be_a_permutation(tmp_path, ranks, shown):
    message = problems(tmp_path, "ranked", {"prompt": "p", "completions": ["a", "b", "c"], "ranks": ranks})
    assert ("train.jsonl:2: field 'ranks': expected the ranks 1..3 in some order (a permutation: one rank per "
            f"completion, 1 = best, no ties), got {shown}") in message


def test_ranked_needs_exactly_one_of_scores_and_ranks(tmp_path):
    message = problems(
        tmp_path, "ranked",
        {"prompt": "p", "completions": ["a", "b"]},
        {"prompt": "p", "completions": ["a", "b"], "scores": [1, 2], "ranks": [1, 2]},
    )
    assert ("train.jsonl:2: fields 'scores' and 'ranks': both missing (expected one of them: scores, one number "
            "per completion, or ranks, a permutation of 1..K); the row has fields 'prompt', 'completions'") in message
    assert "train.jsonl:3: fields 'scores' and 'ranks': give one of them, not both" in message


def test_ranked_conversation_not_ending_with_the_assistant(tmp_path):
    row = {"prompt": [user("q")], "completions": [[assistant("a")], [assistant("b"), user("?")]], "ranks": [1, 2]}
    message = problems(tmp_path, "ranked", row)
    assert ("train.jsonl:2: field 'completions' item 2: the conversation must end with an assistant message") in message


def test_ranked_scores_keep_file_order_and_slots_are_best_first(tmp_path):
    example = load_one(tmp_path, "ranked", {"prompt": "p", "completions": ["a", "b", "c", "d"], "scores": [1, 3, 1, 2]})
    assert example == RankedExample("train.jsonl:1", "p", ["a", "b", "c", "d"], [1.0, 3.0, 1.0, 2.0])
    assert example.order == [1, 3, 0, 2]  # ties (a, c) keep file order
    assert example.slots == ["b", "d", "a", "c"] and example.ranked_scores == [3.0, 2.0, 1.0, 1.0]


def test_ranked_ranks_become_negative_scores(tmp_path):
    example = load_one(tmp_path, "ranked", {"prompt": "p", "completions": ["a", "b", "c"], "ranks": [2, 3, 1]})
    assert example.scores == [-2.0, -3.0, -1.0] and example.slots == ["c", "a", "b"]


def test_ranked_conversations_with_the_prompt_repeated(tmp_path):
    row = {"prompt": [user("q")], "completions": [[user("q"), assistant("a")], [user("q"), assistant("b")]],
           "ranks": [1, 2]}
    example = load_one(tmp_path, "ranked", row)
    assert example.completions == [[assistant("a")], [assistant("b")]] and example.prompt == [user("q")]


# ------------------------------------------------------------------ column mapping, CSV cells, skipping


def test_new_canonical_names_map_to_file_columns(tmp_path):
    columns = {"prompt": "question", "completions": "responses", "ranks": "order"}
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"question": "q", "responses": ["a", "b"], "order": [2, 1]},
        {"question": "q", "responses": ["a", "b"], "order": [2, 2]},
    ])
    with pytest.raises(DataValidationError) as info:
        load_examples(DataConfig(train_file=str(path), columns=columns), "ranked")
    assert "train.jsonl:2: field 'order' (ranks): expected the ranks 1..2 in some order" in str(info.value)
    columns = {"label": "is_good", "completion": "answer"}
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "answer": "a", "is_good": 0}])
    splits = load_examples(DataConfig(train_file=str(path), columns=columns), "unpaired")
    assert splits.train == [UnpairedExample("kto.jsonl:1", "q", "a", False)]


def test_csv_cells_are_read_as_json_for_labels_scores_and_lists(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('prompt,completion,label\np,c,True\np,d,0\np,e,yes\n', encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        load_examples(DataConfig(train_file=str(path)), "unpaired")
    assert f"train.csv:4: field 'label': {LABEL}, got 'yes' (CSV cells of this field are read as JSON)" in str(info.value)
    path.write_text('prompt,completions,scores\np,"[""a"", ""b""]","[0.5, 1]"\n', encoding="utf-8")
    assert load_examples(DataConfig(train_file=str(path)), "ranked").train == [
        RankedExample("train.csv:2", "p", ["a", "b"], [0.5, 1.0])]


def test_skip_leaves_out_bad_rows_of_any_shape(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD["scored"], {"prompt": "p", "completion": "c", "score": "x"}])
    splits = load_examples(DataConfig(train_file=str(path), on_invalid="skip"), "scored", report_dir=tmp_path)
    assert [e.source for e in splits.train] == ["train.jsonl:1"] and splits.skipped == 1
    report = json.loads((tmp_path / "skipped_rows.jsonl").read_text(encoding="utf-8"))
    assert report["problems"] == ["field 'score': expected a finite number, got 'x'"]


def test_row_that_is_not_an_object_names_the_shape_fields(tmp_path):
    message = problems(tmp_path, "ranked", "[1, 2]")
    assert 'train.jsonl:2: expected an object with fields prompt, completions, and scores or ranks, got a list [1, 2]' in message
