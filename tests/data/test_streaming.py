"""data.streaming: the same examples, token ids and training run as without it, while rows are read from
disk only when needed and memory does not grow with the file."""

from __future__ import annotations

import copy
import json
import tracemalloc

import pytest

from preftune.config import Config, DataConfig, config_from_dict
from preftune.data import DataValidationError, load_examples
from preftune.data.prepare import tokenize_splits
from preftune.data.streaming import JsonlRows, LazyExamples, LazyTokenized
from preftune.testing import tiny_tokenizer


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def pair(i, length=1):
    return {"prompt": f"Review {i}:", "chosen": " good film " * length + str(i), "rejected": f" bad film {i}"}


def splits_and_tokens(path, streaming, **data):
    config = Config(data=DataConfig(train_file=str(path), streaming=streaming, **data))
    splits = load_examples(config.data, "pairs", seed=5)
    return splits, tokenize_splits(config, splits, tiny_tokenizer())


def as_tuples(tokenized):
    return [(t.index, t.prompt_ids, t.completions) for t in tokenized]


def test_streaming_gives_the_same_examples_and_token_ids(tmp_path):
    """A bad row skipped, a row that truncation drops (its prompt fills max_length), a 25% held-out split:
    every example, source, index and token id is the same read whole or streamed."""
    rows = [pair(i) for i in range(14)]
    rows[3] = {"prompt": "x", "chosen": "", "rejected": "b"}
    rows[6] = {"prompt": "word " * 80, "chosen": " a", "rejected": " b"}
    path = write_rows(tmp_path / "pairs.jsonl", rows[:5] + [""] + rows[5:])
    options = {"on_invalid": "skip", "eval_fraction": 0.25, "max_length": 40, "max_prompt_length": None}
    eager, eager_tokens = splits_and_tokens(path, False, **options)
    lazy, lazy_tokens = splits_and_tokens(path, True, **options)
    assert isinstance(lazy.train, LazyExamples) and isinstance(lazy_tokens.train, LazyTokenized)
    assert list(lazy.train) == eager.train and list(lazy.eval) == eager.eval
    assert lazy.skipped == eager.skipped == 1
    assert as_tuples(lazy_tokens.train) == as_tuples(eager_tokens.train)
    assert as_tuples(lazy_tokens.eval) == as_tuples(eager_tokens.eval)
    assert [as_tuples([lazy_tokens.train[i]]) for i in (4, 0)] == [as_tuples([eager_tokens.train[i]]) for i in (4, 0)]
    assert lazy_tokens.summaries == eager_tokens.summaries
    assert any("dropped because a completion would be empty: pairs.jsonl:8" in s for s in lazy_tokens.summaries)


def test_rows_are_read_when_an_example_is_asked_for(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "pairs.jsonl", [pair(i) for i in range(40)])
    splits, tokens = splits_and_tokens(path, True)
    reads = []
    original = JsonlRows.row
    monkeypatch.setattr(JsonlRows, "row", lambda self, i: reads.append(i) or original(self, i))
    example = tokens.train[17]
    assert reads == [17]  # one row read, validated and tokenized for one example
    assert example.index == 17 and tiny_tokenizer().decode(example.prompt_ids) == "<s>Review 17:"


def _peak_bytes(path, streaming) -> int:
    tracemalloc.start()
    try:
        splits, tokens = splits_and_tokens(path, streaming)
        for example in tokens.train:  # what an epoch of training reads
            assert example.completions
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_file(tmp_path):
    """780 more rows of ~0.7 kB (+0.57 MB of file): the eager path holds them all (measured +7.7 MB of Python
    objects); streamed, the peak is one tokenization chunk (256 examples) and grows only by the row index,
    24 bytes a row (~19 kB; measured +49 kB)."""
    small = write_rows(tmp_path / "small.jsonl", [pair(i, 60) for i in range(260)])
    large = write_rows(tmp_path / "large.jsonl", [pair(i, 60) for i in range(1040)])
    eager_growth = _peak_bytes(large, False) - _peak_bytes(small, False)
    streamed_growth = _peak_bytes(large, True) - _peak_bytes(small, True)
    assert eager_growth > 4_000_000  # the measurement sees rows held in memory
    assert streamed_growth < 128 * 1024


def test_invalid_lines_are_named_while_streaming(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"".join([json.dumps(pair(0)).encode() + b"\n", b'{"prompt": "\xff"}\n', b"{oops\n",
                               json.dumps({"prompt": "p", "chosen": "a"}).encode() + b"\n"]))
    with pytest.raises(DataValidationError) as caught:
        load_examples(DataConfig(train_file=str(path), streaming=True), "pairs")
    message = str(caught.value)
    assert "3 of 4 rows are invalid" in message
    assert "pairs.jsonl:2: not UTF-8 text ('utf-8' codec can't decode byte 0xff in position 12" in message
    assert "pairs.jsonl:3: not valid JSON (Expecting property name enclosed in double quotes at column 2)" in message
    assert "pairs.jsonl:4: field 'rejected': missing" in message


def test_parquet_and_csv_while_streaming(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")  # from_parquet's Arrow copy
    import pandas as pd

    pd.DataFrame([pair(i) for i in range(5)]).to_parquet(tmp_path / "pairs.parquet")
    eager = load_examples(DataConfig(train_file=str(tmp_path / "pairs.parquet")), "pairs")
    lazy = load_examples(DataConfig(train_file=str(tmp_path / "pairs.parquet"), streaming=True), "pairs")
    assert list(lazy.train) == eager.train and eager.train[4].source == "pairs.parquet:row 4"
    pd.DataFrame([pair(0)]).to_csv(tmp_path / "pairs.csv", index=False)
    with pytest.raises(DataValidationError, match=r"pairs.csv: data.streaming reads .jsonl, .parquet and datasets"):
        load_examples(DataConfig(train_file=str(tmp_path / "pairs.csv"), streaming=True), "pairs")


def test_a_streamed_training_run_is_the_same_run(base_config, tmp_path):
    from preftune.training import train

    histories = []
    for streaming in (False, True):
        raw = copy.deepcopy(base_config)
        raw["data"]["streaming"] = streaming
        raw["training"].update(output_dir=str(tmp_path / f"run-{streaming}"), tensorboard=False, save_steps=None)
        histories.append(train(config_from_dict(raw)).history)
    assert [row["step"] for row in histories[1]] == [row["step"] for row in histories[0]]
    for eager, streamed in zip(*histories, strict=True):
        assert {k: v for k, v in streamed.items() if k != "tokens_per_second"} == pytest.approx(
            {k: v for k, v in eager.items() if k != "tokens_per_second"}, rel=1e-6)
