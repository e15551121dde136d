"""Row validation: each kind of problem is reported with file, line, field and what was expected; valid
rows become the examples the spec describes (implicit prompts, chat wrapping, SFT messages)."""

from __future__ import annotations

import json

import pytest

from preftune.config import DataConfig
from preftune.data import CompletionExample, DataValidationError, PairExample, load_examples

GOOD = {"prompt": "Rate the film.", "chosen": "A fine film.", "rejected": "Bad."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def problems(tmp_path, rows, shape="pairs", **config) -> str:
    """The DataValidationError message for a train.jsonl whose line 1 is valid and later lines are ``rows``."""
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD if shape == "pairs" else {"prompt": "a", "completion": "b"}, *rows])
    with pytest.raises(DataValidationError) as info:
        load_examples(DataConfig(train_file=str(path), **config), shape)
    return str(info.value)


def load_one(tmp_path, row, shape="pairs", **config):
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    return load_examples(DataConfig(train_file=str(path), **config), shape).train[0]


# ------------------------------------------------------------------ one test per kind of problem


def test_missing_field_names_line_field_and_what_the_row_has(tmp_path):
    message = problems(tmp_path, [{"prompt": "p", "rejected": "r"}])
    assert "train.jsonl:2: field 'chosen': missing (expected a non-empty string or a list of messages)" in message
    assert "the row has fields 'prompt', 'rejected'" in message


def test_missing_prompt_in_a_text_pair(tmp_path):
    message = problems(tmp_path, [{"chosen": "c", "rejected": "r"}])
    assert "train.jsonl:2: field 'prompt': missing (expected a non-empty string; only pairs of message lists" in message


def test_empty_string_matches_the_documented_message(tmp_path):
    message = problems(tmp_path, [{"prompt": "p", "chosen": "", "rejected": "r"}])
    assert "train.jsonl:2: field 'chosen': expected a non-empty string or a list of messages, got ''" in message


def test_whitespace_only_string_is_empty(tmp_path):
    message = problems(tmp_path, [{"prompt": "  \n", "chosen": "c", "rejected": "r"}])
    assert "train.jsonl:2: field 'prompt': expected a non-empty string or a list of messages, got '  \\n'" in message


@pytest.mark.parametrize(
    "value, shown",
    [(3, "3 (a number)"), (None, "null"), ({"text": "hi"}, 'an object {"text": "hi"}'), (True, "true (a boolean)")],
)
def test_wrong_type_says_what_it_got(tmp_path, value, shown):
    message = problems(tmp_path, [{"prompt": "p", "chosen": "c", "rejected": value}])
    assert f"train.jsonl:2: field 'rejected': expected a non-empty string or a list of messages, got {shown}" in message


def test_chosen_identical_to_rejected(tmp_path):
    message = problems(tmp_path, [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    assert "train.jsonl:2: fields 'chosen' and 'rejected' are identical; a preference pair needs two different" in message


def test_unknown_role(tmp_path):
    row = {"prompt": [user("hi")], "chosen": [assistant("a"), {"role": "bot", "content": "b"}], "rejected": [assistant("c")]}
    message = problems(tmp_path, [row])
    assert (
        "train.jsonl:2: unknown role 'bot' in message 2 of 'chosen'; expected one of system, user, assistant, tool"
        in message
    )


def test_message_missing_role_or_content_and_content_not_a_string(tmp_path):
    row = {"prompt": [{"content": "hi"}], "chosen": [{"role": "assistant"}], "rejected": [assistant(["x"])]}
    message = problems(tmp_path, [row])
    assert "train.jsonl:2: message 1 of 'prompt' has no 'role'; expected one of system, user" in message
    assert "train.jsonl:2: message 1 of 'chosen' has no 'content'; expected a string" in message
    assert "train.jsonl:2: message 1 of 'rejected': 'content' must be a string, got a list [\"x\"]" in message


def test_message_that_is_not_an_object(tmp_path):
    message = problems(tmp_path, [{"prompt": ["hi"], "chosen": [assistant("a")], "rejected": [assistant("b")]}])
    assert "train.jsonl:2: message 1 of 'prompt': expected an object with 'role' and 'content', got 'hi'" in message


def test_conversation_not_ending_with_assistant(tmp_path):
    row = {"prompt": [user("hi")], "chosen": [assistant("a"), user("more?")], "rejected": [assistant("b")]}
    message = problems(tmp_path, [row])
    assert (
        "train.jsonl:2: field 'chosen': the conversation must end with an assistant message, but its last "
        "message has role 'user'" in message
    )


def test_empty_message_list(tmp_path):
    message = problems(tmp_path, [{"prompt": [user("hi")], "chosen": [], "rejected": [assistant("b")]}])
    assert "train.jsonl:2: field 'chosen': empty message list; expected at least one {role, content} message" in message


def test_text_prompt_with_message_completions_is_mixed(tmp_path):
    message = problems(tmp_path, [{"prompt": "hi", "chosen": [assistant("a")], "rejected": [assistant("b")]}])
    assert (
        "train.jsonl:2: mixed formats: 'prompt' is text, 'chosen' is a list of messages, 'rejected' is a list of "
        "messages; expected prompt, chosen and rejected all as text, or all as lists of messages" in message
    )


def test_chosen_text_rejected_messages_is_mixed(tmp_path):
    message = problems(tmp_path, [{"prompt": "hi", "chosen": "a", "rejected": [assistant("b")]}])
    assert "train.jsonl:2: mixed formats: 'prompt' is text, 'chosen' is text, 'rejected' is a list of messages" in message


def test_invalid_json_line(tmp_path):
    message = problems(tmp_path, ['{"prompt": "p", "chosen": "c",'])
    assert "train.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes at column 31)" in message


def test_row_that_is_not_an_object(tmp_path):
    message = problems(tmp_path, [["p", "c", "r"]])
    assert 'train.jsonl:2: expected an object with fields prompt, chosen, rejected, got a list ["p", "c", "r"]' in message


def test_empty_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match="train.jsonl: the file is empty: it has no rows"):
        load_examples(DataConfig(train_file=str(path)), "pairs")


def test_conversational_rows_with_chat_template_false(tmp_path):
    message = problems(
        tmp_path, [{"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}], chat_template=False
    )
    assert "train.jsonl:2: field 'prompt': a list of messages needs the chat template, but data.chat_template is false" in message


def test_no_shared_prefix_and_no_prompt(tmp_path):
    message = problems(tmp_path, [{"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]}])
    assert "train.jsonl:2: fields 'chosen' and 'rejected' share no leading messages, so there is no prompt" in message


def test_implicit_prompt_leaving_a_completion_empty(tmp_path):
    row = {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b"), user("c"), assistant("d")]}
    message = problems(tmp_path, [row])
    assert "train.jsonl:2: field 'chosen': no messages after the prompt; expected at least one assistant message" in message


def test_mapped_columns_are_named_as_in_the_file(tmp_path):
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "response_j": "", "response_k": "k"}])
    with pytest.raises(DataValidationError) as info:
        load_examples(DataConfig(train_file=str(path), columns=columns), "pairs")
    assert "train.jsonl:1: field 'response_j' (chosen): expected a non-empty string or a list of messages, got ''" in str(
        info.value
    )


def test_every_problem_of_every_row_is_reported_up_to_the_limit(tmp_path):
    rows = [{"prompt": "p", "chosen": "", "rejected": 5} for _ in range(3)] + ["not json"]
    message = problems(tmp_path, rows, max_errors_reported=4)
    lines = message.splitlines()
    assert lines[0].startswith("4 of 5 rows are invalid")
    assert [line.split(": field")[0].strip() for line in lines[1:5]] == [
        "train.jsonl:2", "train.jsonl:2", "train.jsonl:3", "train.jsonl:3",
    ]
    # 3 rows x 2 problems + 1 invalid line = 7 problems, 4 shown
    assert lines[5] == "  ... and 3 more problems"
    assert len(lines) == 6


# ------------------------------------------------------------------ what valid rows become


def test_implicit_prompt_is_the_longest_shared_prefix(tmp_path):
    system = {"role": "system", "content": "be brief"}
    row = {
        "chosen": [system, user("hi"), assistant("hello!")],
        "rejected": [system, user("hi"), assistant("go away"), user("?"), assistant("no")],
        "id": 17,  # extra columns are ignored
    }
    example = load_one(tmp_path, row)
    assert example == PairExample(
        "train.jsonl:1",
        [system, user("hi")],
        [assistant("hello!")],
        [assistant("go away"), user("?"), assistant("no")],
    )


def test_text_prompt_repeated_inside_full_conversations_is_dropped(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: prompt is text, chosen/rejected already start with it."""
    row = {"prompt": "hi", "chosen": [user("hi"), assistant("a")], "rejected": [user("hi"), assistant("b")]}
    assert load_one(tmp_path, row) == PairExample("train.jsonl:1", [user("hi")], [assistant("a")], [assistant("b")])


def test_message_prompt_repeated_at_the_start_of_both_conversations_is_not_doubled(tmp_path):
    row = {"prompt": [user("hi")], "chosen": [user("hi"), assistant("a")], "rejected": [user("hi"), assistant("b")]}
    assert load_one(tmp_path, row) == PairExample("train.jsonl:1", [user("hi")], [assistant("a")], [assistant("b")])


def test_chat_template_true_wraps_text(tmp_path):
    example = load_one(tmp_path, GOOD, chat_template=True)
    assert example == PairExample(
        "train.jsonl:1", [user("Rate the film.")], [assistant("A fine film.")], [assistant("Bad.")]
    )


def test_text_pair_stays_text_by_default(tmp_path):
    assert load_one(tmp_path, GOOD) == PairExample("train.jsonl:1", "Rate the film.", "A fine film.", "Bad.")


def test_sft_messages_split_into_prompt_and_last_assistant_turn(tmp_path):
    messages = [user("a"), assistant("b"), user("c"), assistant("d")]
    example = load_one(tmp_path, {"messages": messages, "prompt": "ignored, like ultrachat's"}, shape="completions")
    assert example == CompletionExample("train.jsonl:1", messages[:3], [assistant("d")])


def test_sft_prompt_completion(tmp_path):
    example = load_one(tmp_path, {"prompt": "a", "completion": "b"}, shape="completions", chat_template=True)
    assert example == CompletionExample("train.jsonl:1", [user("a")], [assistant("b")])


def test_sft_problems(tmp_path):
    rows = [
        {"messages": [user("a")]},
        {"messages": [assistant("only")]},
        {"messages": "text"},
        {"text": "x"},
        {"prompt": "a", "completion": [assistant("b")]},
    ]
    message = problems(tmp_path, rows, shape="completions")
    assert (
        "train.jsonl:2: field 'messages': the conversation must end with an assistant message, but its last "
        "message has role 'user'" in message
    )
    assert "train.jsonl:3: field 'messages': expected at least one message (the prompt) before the final" in message
    assert "train.jsonl:4: field 'messages': expected a list of messages ending with an assistant message, got 'text'" in message
    assert "train.jsonl:5: missing fields: expected 'prompt' and 'completion', or 'messages'" in message
    assert "train.jsonl:6: mixed formats: 'prompt' is text, 'completion' is a list of messages" in message


def test_unknown_canonical_name_in_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    with pytest.raises(DataValidationError, match="data.columns: unknown field 'answer'"):
        load_examples(DataConfig(train_file=str(path), columns={"answer": "x"}), "pairs")
