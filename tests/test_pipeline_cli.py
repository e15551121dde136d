"""The whole pipeline through the command line, as docs/pipeline.md runs it: generate -> label with a judge ->
train -> generate from the trained adapter and from the base -> win rate, reward and KL (``preftune eval`` on a
winrate recipe). The judge counts letters e, so every number in the report is recomputed here from the files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from preftune.cli import main


def count_e(completion):
    return float(completion.count("e"))


def _recipe(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _generate(tmp_path: Path, model: str, prompts: Path, output: Path, samples: int, seed: int) -> None:
    recipe = _recipe(tmp_path / f"generate_{output.stem}.yaml", {
        "model": {"name_or_path": model}, "prompts": {"file": str(prompts), "chat_template": False},
        "sampling": {"num_samples": samples, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": seed},
        "batch_size": 4, "output_file": str(output), "progress_bar": False})
    assert main(["generate", str(recipe)]) == 0


def test_generate_label_train_evaluate(tmp_path, tiny_model_dir):
    judge = {"type": "function", "function": f"{__name__}:count_e"}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The film number {i} was"}) + "\n" for i in range(12)))

    _generate(tmp_path, str(tiny_model_dir), prompts, tmp_path / "samples.jsonl", samples=4, seed=0)
    pairs = tmp_path / "pairs.jsonl"
    assert main(["label", str(_recipe(tmp_path / "label.yaml", {
        "input_file": str(tmp_path / "samples.jsonl"), "output_file": str(pairs), "format": "best_vs_worst",
        "judge": judge, "progress_bar": False}))]) == 0
    labelled = _rows(pairs)
    assert labelled and all(count_e(r["chosen"]) > count_e(r["rejected"]) for r in labelled)

    run_dir = tmp_path / "dpo"
    assert main(["train", str(_recipe(tmp_path / "dpo.yaml", {
        "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train_file": str(pairs), "max_length": 48},
        "objective": {"name": "dpo", "beta": 0.1}, "lora": {"enabled": True, "r": 4, "alpha": 8},
        "training": {"output_dir": str(run_dir), "batch_size": 4, "learning_rate": 1e-2, "max_steps": 3,
                     "save_steps": None, "tensorboard": False, "progress_bar": False}}))]) == 0

    _generate(tmp_path, str(run_dir / "final"), prompts, tmp_path / "dpo_samples.jsonl", samples=2, seed=1)
    _generate(tmp_path, str(tiny_model_dir), prompts, tmp_path / "base_samples.jsonl", samples=2, seed=1)
    report_file = tmp_path / "winrate.json"
    assert main(["eval", str(_recipe(tmp_path / "winrate.yaml", {
        "model_file": str(tmp_path / "dpo_samples.jsonl"), "baseline_file": str(tmp_path / "base_samples.jsonl"),
        "judge": judge, "kl": {"reference": str(tiny_model_dir)}, "output_file": str(report_file),
        "progress_bar": False}))]) == 0
    report = json.loads(report_file.read_text())

    model_rows, base_rows = _rows(tmp_path / "dpo_samples.jsonl"), _rows(tmp_path / "base_samples.jsonl")
    assert model_rows[0]["model"] == str(run_dir / "final")
    model_scores = [[count_e(c) for c in r["completions"]] for r in model_rows]
    base_scores = [[count_e(c) for c in r["completions"]] for r in base_rows]
    assert report["reward"]["model"]["mean"] == pytest.approx(statistics.fmean(s for p in model_scores for s in p))
    assert report["reward"]["baseline"]["mean"] == pytest.approx(statistics.fmean(s for p in base_scores for s in p))
    # win 1, tie 0.5, loss 0; sample k against sample k; each prompt weighs the same
    per_prompt = [statistics.fmean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(m, b_, strict=True))
                  for m, b_ in zip(model_scores, base_scores, strict=True)]
    assert report["win_rate"]["win_rate"] == pytest.approx(statistics.fmean(per_prompt))
    low, high = report["win_rate"]["ci_low"], report["win_rate"]["ci_high"]
    assert low <= report["win_rate"]["win_rate"] <= high
    assert report["kl"]["samples"] == 24 and report["kl"]["policy"] == str(run_dir / "final")
    assert report["kl"]["mean"] != 0.0  # three DPO steps at lr 1e-2 moved the adapter off the reference


def test_pairs_train_on_the_prompt_format_they_were_sampled_in(tmp_path, tiny_model_dir):
    """`generate` renders a text prompt through the chat template (the tokenizer has one): the pairs `label`
    writes must tokenize, for training, to exactly the prompt ids the samples continued."""
    from preftune.config import DataConfig
    from preftune.data import load_examples, tokenize_examples
    from preftune.feedback.sampling import encode_prompt
    from preftune.modeling import load_tokenizer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Review film {i}."}) + "\n" for i in range(3)))
    recipe = _recipe(tmp_path / "generate.yaml", {
        "model": {"name_or_path": str(tiny_model_dir)}, "prompts": {"file": str(prompts)},
        "sampling": {"num_samples": 3, "max_new_tokens": 5, "temperature": 1.0, "seed": 0},
        "output_file": str(tmp_path / "samples.jsonl"), "progress_bar": False})
    assert main(["generate", str(recipe)]) == 0
    assert all(r["generation"]["chat_template"] for r in _rows(tmp_path / "samples.jsonl"))
    pairs = tmp_path / "pairs.jsonl"
    assert main(["label", str(_recipe(tmp_path / "label.yaml", {
        "input_file": str(tmp_path / "samples.jsonl"), "output_file": str(pairs), "progress_bar": False,
        "judge": {"type": "function", "function": f"{__name__}:count_e"}}))]) == 0
    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = DataConfig(train_file=str(pairs), max_length=None, max_prompt_length=None)
    examples = load_examples(data, "pairs").train
    tokenized, _ = tokenize_examples(examples, tokenizer, data)
    for example, ids in zip(examples, tokenized, strict=True):
        assert example.prompt == [{"role": "user", "content": example.prompt[0]["content"]}]
        assert ids.prompt_ids == encode_prompt(tokenizer, example.prompt[0]["content"], True)
