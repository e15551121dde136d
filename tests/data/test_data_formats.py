"""Formats users bring: raw Anthropic HH transcripts (no prompt column), TL;DR's nested fields read through
column paths, and a row-mapping function named by import path. Errors still name file:line:field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.config import ConfigError, DataConfig
from preftune.data import DataValidationError, PairExample, load_examples, tokenize_examples
from preftune.testing import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def hh(*turns: str) -> str:
    """Alternating Human / Assistant turns in the raw HH layout."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {text}" for i, text in enumerate(turns))


def load(path: Path, **config):
    return load_examples(DataConfig(train_file=str(path), **config), "pairs")


def invalid(path: Path, **config) -> str:
    with pytest.raises(DataValidationError) as caught:
        load(path, **config)
    return str(caught.value)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- Anthropic HH


def test_hh_transcripts_become_conversations_with_the_shared_turns_as_prompt(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": hh("Hi", "Hello!"), "rejected": hh("Hi", "Go away.")},
        {"chosen": hh("Hi", "Hello!", "A joke?", "Why did the film cross the road?"),
         "rejected": hh("Hi", "Hello!", "A joke?", "No.")},
    ])
    assert load(path).train == [
        PairExample("hh.jsonl:1", [user("Hi")], [assistant("Hello!")], [assistant("Go away.")]),
        PairExample("hh.jsonl:2", [user("Hi"), assistant("Hello!"), user("A joke?")],
                    [assistant("Why did the film cross the road?")], [assistant("No.")]),
    ]


def test_hh_multi_turn_history_is_what_the_model_is_prompted_with():
    """ChatML (preftune.testing.CHATML_TEMPLATE), written out by hand: BOS, then each turn as
    <|im_start|>ROLE\\nCONTENT<|im_end|>\\n, then the generation header <|im_start|>assistant\\n; the
    completion is the rest of the rendered turn and the EOS (</s>) preftune appends."""
    tokenizer = tiny_tokenizer()
    example = PairExample("hh:1", [user("Hi"), assistant("Hello!"), user("A joke?")], [assistant("Ha.")],
                          [assistant("No.")])
    [tokenized], _ = tokenize_examples([example], tokenizer, DataConfig())
    expected = ("<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                "<|im_start|>user\nA joke?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenized.prompt_ids) == expected
    assert tokenizer.decode(tokenized.chosen_ids) == "Ha.<|im_end|>\n</s>"  # the template's turn end, then EOS


def test_hh_as_text_for_models_without_a_chat_template(tmp_path):
    """data.chat_template: false keeps the DPO paper's layout: the prompt ends with "\\n\\nAssistant:"."""
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": hh("Hi", "Hello!", "A joke?", "Ha."), "rejected": hh("Hi", "Hello!", "A joke?", "No.")}])
    assert load(path, chat_template=False).train == [PairExample(
        "hh.jsonl:1", "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant:", " Ha.", " No.")]


def test_malformed_transcripts_are_row_errors_naming_the_line_and_turn(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": hh("Hi", "Hello!"), "rejected": hh("Hi", "Go away.")},
        {"chosen": hh("Hi", "Hello!"), "rejected": "Assistant: I start the talk.\n\nHuman: odd"},
        {"chosen": hh("Hi", "Hello!"), "rejected": "\n\nHuman: Hi\n\nHuman: again\n\nAssistant: yes"},
        {"chosen": hh("Hi", ""), "rejected": hh("Hi", "Go away.")},
        {"chosen": hh("Hi", "Hello!", "Bye"), "rejected": hh("Hi", "Go away.")},
        {"chosen": "Preface\n\nHuman: Hi\n\nAssistant: a", "rejected": hh("Hi", "b")},
        {"chosen": hh("Hi", "Hello!"), "rejected": hh("Hi", "Hello!")},
    ])
    message = invalid(path)
    assert "6 of 7 rows are invalid" in message
    assert ("hh.jsonl:2: field 'rejected': turn 1 (Assistant) opens the transcript; turns must alternate Human, "
            "Assistant, Human, ... starting with Human") in message
    assert "hh.jsonl:3: field 'rejected': turn 2 (Human) follows another Human turn" in message
    assert "hh.jsonl:4: field 'chosen': turn 2 (Assistant) is empty" in message
    assert ("hh.jsonl:5: field 'chosen': the conversation must end with an assistant message, but its last "
            "message has role 'user'") in message
    assert "hh.jsonl:6: field 'chosen': an Anthropic HH transcript starts with a Human turn" in message
    assert "hh.jsonl:7: fields 'chosen' and 'rejected' are identical" in message


def test_the_bundled_hh_example_loads():
    splits = load(ROOT / "examples" / "hh_transcripts.jsonl")
    assert len(splits.train) == 6
    assert [len(e.prompt) for e in splits.train] == [1, 1, 3, 1, 3, 1]  # two rows carry earlier turns


# ---------------------------------------------------------------- nested fields


def tldr_row(choice, post="A long post.", texts=(" first", " second")):
    return {"info": {"post": post, "title": "t"}, "summaries": [{"text": t} for t in texts], "choice": choice}


TLDR_COLUMNS = {"prompt": "info.post", "chosen": "summaries[choice].text", "rejected": "summaries[1-choice].text"}


def test_column_paths_pick_nested_fields_and_indices_from_another_field(tmp_path):
    path = write_jsonl(tmp_path / "tldr.jsonl", [tldr_row(0), tldr_row(1, post="Other.")])
    assert load(path, columns=TLDR_COLUMNS).train == [
        PairExample("tldr.jsonl:1", "A long post.", " first", " second"),
        PairExample("tldr.jsonl:2", "Other.", " second", " first"),
    ]
    fixed = load(path, columns={"prompt": "info.post", "chosen": "summaries[0].text", "rejected": "summaries[-1].text"})
    assert [(e.chosen, e.rejected) for e in fixed.train] == [(" first", " second")] * 2


def test_column_path_errors_name_the_line_the_path_and_where_it_stopped(tmp_path):
    rows = [tldr_row(0), tldr_row(2), {"info": {"title": "no post"}, "summaries": [], "choice": 0},
            tldr_row("zero"), {"info": "flat", "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}]
    message = invalid(write_jsonl(tmp_path / "tldr.jsonl", rows), columns=TLDR_COLUMNS)
    assert "4 of 5 rows are invalid" in message
    assert ("tldr.jsonl:2: field 'summaries[choice].text' (chosen): not found: 'summaries' has 2 items; index "
            "[choice=2] is out of range (expected a non-empty string or a list of messages)") in message
    assert "tldr.jsonl:3: field 'info.post' (prompt): not found: 'info' has no field 'post' (fields: 'title')" in message
    assert "tldr.jsonl:4: field 'summaries[choice].text' (chosen): not found: the index [choice] reads 'zero'" in message
    assert "tldr.jsonl:5: field 'info.post' (prompt): not found: 'info' is text, not an object with a field 'post'" \
        in message


def test_malformed_column_paths_fail_before_any_row_is_read(tmp_path):
    with pytest.raises(DataValidationError, match=r"^data.columns.chosen: 'summaries\[choice' is not a column path"):
        load(tmp_path / "absent.jsonl", columns={"chosen": "summaries[choice"})


def test_a_column_whose_name_holds_a_dot_is_found_by_name_first(tmp_path):
    path = write_jsonl(tmp_path / "dots.jsonl", [{"q.text": "p", "chosen": "a", "rejected": "b"}])
    assert load(path, columns={"prompt": "q.text"}).train == [PairExample("dots.jsonl:1", "p", "a", "b")]


# ---------------------------------------------------------------- row mapper


def test_row_mapper_by_file_path_builds_the_tldr_prompt():
    path = ROOT / "examples" / "tldr_comparisons.jsonl"
    mapper = f"{ROOT / 'examples' / 'tldr_prompt.py'}:to_pair"
    first = load(path, row_mapper=mapper).train[0]
    row = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    info = row["info"]
    assert first == PairExample(
        "tldr_comparisons.jsonl:1",
        f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:",
        row["summaries"][row["choice"]]["text"], row["summaries"][1 - row["choice"]]["text"])


def test_row_mapper_failures_are_row_errors_and_bad_specs_config_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rows.py").write_text(
        "def pick(row):\n"
        "    if row.get('skip'):\n"
        "        return None\n"
        "    return {'prompt': row['q'], 'chosen': row['a'], 'rejected': row['b']}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # a module in the working directory, as a user's my_rows.py is
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_jsonl(tmp_path / "raw.jsonl", [{"q": "p", "a": "x", "b": "y"}, {"q": "p"}, {"skip": True}])
    message = invalid(path, row_mapper="my_rows:pick")
    assert "raw.jsonl:2: data.row_mapper raised KeyError: 'a'" in message
    assert "raw.jsonl:3: data.row_mapper returned null, expected an object (a dict of fields)" in message
    assert load(path, row_mapper="my_rows:pick", on_invalid="skip").train == [PairExample("raw.jsonl:1", "p", "x", "y")]
    with pytest.raises(ConfigError, match=r"config key 'data.row_mapper': 'my_rows' has no function 'nope'"):
        load(path, row_mapper="my_rows:nope")
