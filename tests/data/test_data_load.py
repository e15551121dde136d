"""File reading: every format yields the same examples, each tagged with the exact line / item / row it
came from; eval splits, the skip report and file-level errors."""

from __future__ import annotations

import json
import logging

import pytest

from preftune.config import DataConfig
from preftune.data import DataValidationError, PairExample, load_examples, read_rows

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path, shape="pairs", **config):
    return load_examples(DataConfig(train_file=str(path), **config), shape)


def pairs(sources):
    return [PairExample(s, f"p{i}", f"c{i}", f"r{i}") for i, s in enumerate(sources)]


def test_jsonl_sources_are_one_based_lines_and_blank_lines_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], "", "   ", ROWS[1], ROWS[2]])
    assert load(path).train == pairs(["train.jsonl:1", "train.jsonl:4", "train.jsonl:5"])


def test_jsonl_keeps_a_raw_line_separator_inside_a_string(tmp_path):
    """U+2028 may appear unescaped in JSON; str.splitlines() would cut the line there."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a\u2028b", "chosen": "c", "rejected": "r"}\n', encoding="utf-8")
    assert load(path).train[0].prompt == "a\u2028b"


def test_json_list_sources_are_zero_based_items(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert load(path).train == pairs(["train.json:item 0", "train.json:item 1", "train.json:item 2"])


def test_json_object_with_a_data_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    assert load(path).train == pairs(["train.json:item 0", "train.json:item 1", "train.json:item 2"])


def test_json_extension_holding_jsonl_is_read_by_line(tmp_path):
    path = write_jsonl(tmp_path / "train.json", ROWS)
    assert load(path).train == pairs(["train.json:1", "train.json:2", "train.json:3"])


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"prompt": ["p"], "chosen": ["c"]}', encoding="utf-8")
    with pytest.raises(DataValidationError, match="train.json: expected a list of objects at the top level"):
        load(path)


def test_csv_sources_are_file_lines_with_quoted_newlines(tmp_path):
    """Line 1 header; row p0 spans lines 2-3 (quoted newline); line 4 blank; p1 on 5; p2 on 6."""
    path = tmp_path / "train.csv"
    path.write_text(
        '\ufeffprompt,chosen,rejected,extra\n"p0",c0,"r0\nstill r0",x\n\np1,c1,r1,x\np2,c2,r2,x\n', encoding="utf-8"
    )
    train = load(path).train
    assert train == [
        PairExample("train.csv:2", "p0", "c0", "r0\nstill r0"),
        PairExample("train.csv:5", "p1", "c1", "r1"),
        PairExample("train.csv:6", "p2", "c2", "r2"),
    ]


def test_csv_row_with_the_wrong_number_of_fields(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,chosen,rejected\np,c,r\np,c\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"train.csv:3: has 2 fields but the header \(line 1\) has 3"):
        load(path)


def test_parquet_rows_including_message_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS[:2]), tmp_path / "train.parquet")
    assert load(tmp_path / "train.parquet").train == pairs(["train.parquet:row 0", "train.parquet:row 1"])

    chat = [{
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}],
    }]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "chat.parquet")
    assert load(tmp_path / "chat.parquet").train == [PairExample(
        "chat.parquet:row 0", [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "a"}],
        [{"role": "assistant", "content": "b"}],
    )]


def test_saved_dataset_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "prefs"))
    assert load(tmp_path / "prefs").train == pairs(["prefs:row 0", "prefs:row 1", "prefs:row 2"])

    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS)})
    both.save_to_disk(str(tmp_path / "dict"))
    config = DataConfig(train_file=str(tmp_path / "dict"), eval_file=str(tmp_path / "dict"))
    splits = load_examples(config, "pairs")
    assert [e.source for e in splits.train] == ["dict/train:row 0", "dict/train:row 1"]
    assert [e.source for e in splits.eval] == ["dict/test:row 0", "dict/test:row 1", "dict/test:row 2"]

    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "h4"))
    with pytest.raises(DataValidationError, match=r"h4: a DatasetDict without a 'train' split; its splits are 'train_prefs'"):
        load(tmp_path / "h4")


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataValidationError, match="plain: a folder, but not one written by save_to_disk"):
        load(tmp_path / "plain")


def test_missing_file_and_unknown_extension_name_path_and_formats(tmp_path):
    with pytest.raises(DataValidationError, match=r"nope.jsonl: no such file or folder \(supported data: .jsonl, .json"):
        load(tmp_path / "nope.jsonl")
    (tmp_path / "train.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"train.txt: unsupported file type '.txt' \(supported data: .jsonl"):
        load(tmp_path / "train.txt")


def test_not_utf8_names_the_line_and_column(tmp_path):
    """Latin-1 'é' (0xe9) on line 3, after '{"prompt": "caf' (15 characters): column 16."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataValidationError, match=r"train.jsonl:3: not UTF-8 text \(byte 0xe9 at column 16"):
        read_rows(path)


def test_a_missing_relative_file_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataValidationError, match=rf"nope.jsonl: no such file or folder; looked for {tmp_path}/nope.jsonl"):
        read_rows("nope.jsonl")


def test_text_and_conversational_rows_in_one_file_are_an_error_naming_the_first_other_row(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"},
            {"prompt": [{"role": "user", "content": "r"}], "chosen": [{"role": "assistant", "content": "e"}],
             "rejected": [{"role": "assistant", "content": "f"}]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataValidationError, match=r"mixed.jsonl:3: a conversation \(messages\) row, but the first row "
                                                  r"\(mixed.jsonl:1\) is a text"):
        load_examples(DataConfig(train_file=str(path)), "pairs")
    both = load_examples(DataConfig(train_file=str(path), chat_template=True), "pairs").train
    assert all(isinstance(e.prompt, list) for e in both)  # rendered as conversations, every row alike


def test_eval_fraction_split_is_deterministic_disjoint_and_keeps_file_order(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    config = DataConfig(train_file=str(path), eval_fraction=0.2)
    first, again = load_examples(config, "pairs", seed=3), load_examples(config, "pairs", seed=3)
    assert (first.train, first.eval) == (again.train, again.eval)
    assert len(first.eval) == 2 and len(first.train) == 8
    lines = [int(e.source.split(":")[1]) for e in first.train + first.eval]
    assert sorted(lines) == list(range(1, 11))
    assert lines[:8] == sorted(lines[:8]) and lines[8:] == sorted(lines[8:])
    seeds = {tuple(e.source for e in load_examples(config, "pairs", seed=s).eval) for s in range(6)}
    assert len(seeds) > 1  # the seed decides which rows are held out


def test_eval_fraction_holds_out_at_least_one_and_leaves_at_least_one(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    splits = load_examples(DataConfig(train_file=str(path), eval_fraction=0.01), "pairs")
    assert (len(splits.train), len(splits.eval)) == (1, 1)
    splits = load_examples(DataConfig(train_file=str(path), eval_fraction=0.9), "pairs")
    assert (len(splits.train), len(splits.eval)) == (1, 1)
    one = write_jsonl(tmp_path / "one.jsonl", ROWS[:1])
    with pytest.raises(DataValidationError, match="needs at least 2 valid rows"):
        load_examples(DataConfig(train_file=str(one), eval_fraction=0.5), "pairs")


def test_eval_file_and_problems_in_both_files_reported_together(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [ROWS[0], {"prompt": "p"}])
    bad_train = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "{"])
    splits = load_examples(DataConfig(train_file=str(train), eval_file=str(tmp_path / "train.jsonl")), "pairs")
    assert [e.source for e in splits.eval] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3"]
    with pytest.raises(DataValidationError) as info:
        load_examples(DataConfig(train_file=str(bad_train), eval_file=str(evaluation)), "pairs")
    message = str(info.value)
    assert message.startswith("2 of 4 rows are invalid")
    assert "bad.jsonl:2: not valid JSON" in message and "eval.jsonl:2: field 'chosen': missing" in message


def test_skip_writes_a_report_logs_a_warning_and_counts(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], "{oops", {"prompt": "p", "chosen": "x", "rejected": "x"}, ROWS[1]])
    config = DataConfig(train_file=str(path), on_invalid="skip")
    with caplog.at_level(logging.WARNING, logger="preftune"):
        splits = load_examples(config, "pairs", report_dir=tmp_path / "run")
    assert [e.source for e in splits.train] == ["train.jsonl:1", "train.jsonl:4"]
    assert splits.skipped == 2 and splits.report_path == tmp_path / "run" / "skipped_rows.jsonl"
    report = [json.loads(line) for line in splits.report_path.read_text(encoding="utf-8").splitlines()]
    assert [r["source"] for r in report] == ["train.jsonl:2", "train.jsonl:3"]
    assert report[0]["row"] == "{oops" and report[0]["problems"][0].startswith("not valid JSON")
    assert report[1]["row"] == {"prompt": "p", "chosen": "x", "rejected": "x"}
    assert "identical" in report[1]["problems"][0]
    assert f"skipped 2 invalid rows (data.on_invalid=skip); they and their problems are in {splits.report_path}" in caplog.text


def test_skip_without_report_dir_logs_the_problems(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], {"prompt": "p"}])
    with caplog.at_level(logging.WARNING, logger="preftune"):
        splits = load_examples(DataConfig(train_file=str(path), on_invalid="skip"), "pairs")
    assert splits.skipped == 1 and splits.report_path is None
    assert "train.jsonl:2: field 'chosen': missing" in caplog.text


def test_zero_valid_rows_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p"}, "[1]"])
    with pytest.raises(DataValidationError, match=r"train.jsonl: no valid rows \(2 invalid rows skipped; see "):
        load_examples(DataConfig(train_file=str(path), on_invalid="skip"), "pairs", report_dir=tmp_path)
    assert len((tmp_path / "skipped_rows.jsonl").read_text().splitlines()) == 2


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "response_j": "good", "response_k": "bad", "prompt": "x"}])
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    assert load(path, columns=columns).train == [PairExample("train.jsonl:1", "q", "good", "bad")]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shape must be one of pairs, completions"):
        load_examples(DataConfig(train_file="x.jsonl"), "triples")
    with pytest.raises(DataValidationError, match="data.train_file is not set"):
        load_examples(DataConfig(), "pairs")
