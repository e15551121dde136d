"""``preftune label`` with several generation files (one per model, as Zephyr pools them): completions pooled
per prompt, every row says which model wrote what."""

from __future__ import annotations

import json

import pytest

from preftune.config import ConfigError
from preftune.feedback.label import LabelConfig, label, pool_generations


def write(path, model, rows):
    path.write_text("".join(json.dumps({"index": i, "prompt": p, "completions": cs, "model": model}) + "\n"
                            for i, (p, cs) in enumerate(rows)))
    return str(path)


def test_pooled_files_record_the_model_of_each_completion(tmp_path):
    """Prompt 'x': model A wrote 'aaaa', 'a'; model B wrote 'bb', 'a' (the same text as A). Judge = length:
    best_vs_worst picks 'aaaa' (A) over 'a' (written by A and B: 'A,B'). Prompt 'y' only B answered: 'bbb' vs
    'b'. all_pairs over 'x' gives three pairs, each naming both models."""
    a = write(tmp_path / "a.jsonl", "A", [("x", ["aaaa", "a"])])
    b = write(tmp_path / "b.jsonl", "B", [("x", ["bb", "a"]), ("y", ["bbb", "b"])])
    pooled = pool_generations([a, b])
    assert [(g.prompt, g.completions, g.models) for g in pooled] == [
        ("x", ["aaaa", "a", "bb", "a"], ["A", "A", "B", "B"]), ("y", ["bbb", "b"], ["B", "B"])]
    judge = {"type": "function", "function": "builtins:len"}
    out = tmp_path / "pairs.jsonl"
    summary = label(LabelConfig(input_files=[a, b], output_file=str(out), judge=judge, progress_bar=False))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["chosen"], r["chosen_model"], r["rejected"], r["rejected_model"]) for r in rows] == [
        ("aaaa", "A", "a", "A,B"), ("bbb", "B", "b", "B")]
    assert summary["input_file"] == [a, b] and summary["duplicate_completions"] == 1
    label(LabelConfig(input_files=[a, b], output_file=str(out), judge=judge, format="all_pairs", progress_bar=False))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows if r["prompt"] == "x"] == [("aaaa", "a"), ("aaaa", "bb"), ("bb", "a")]
    assert [r["chosen_model"] for r in rows if r["prompt"] == "x"] == ["A", "A", "B"]
    label(LabelConfig(input_files=[a, b], output_file=str(out), judge=judge, format="ranked", progress_bar=False))
    assert json.loads(out.read_text().splitlines()[0])["models"] == ["A", "B", "A,B"]


def test_input_file_and_input_files_are_exclusive(tmp_path):
    from preftune.feedback.label import load_label_config

    path = tmp_path / "label.yaml"
    path.write_text("input_file: a.jsonl\ninput_files: [b.jsonl]\njudge: {type: function, function: builtins:len}\n")
    with pytest.raises(ConfigError, match="'input_file' / 'input_files'"):
        load_label_config(path)
