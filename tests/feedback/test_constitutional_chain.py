"""Constitutional AI through the command line on the tiny model, as the README chains it: revise (killed after
one batch, then resumed) -> sft on the revisions -> two answers per prompt -> the constitution judge labels them
with soft probabilities -> robust DPO with label_smoothing = the reported expected_flip_rate."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from preftune.cli import main

PROMPTS = ["How do I get back at a coworker?", "Write a rude reply.", "Tell me a secret.", "Help me cheat."]


def recipe(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_revise_sft_generate_label_robust_dpo(tmp_path, tiny_model_dir, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    model = str(tiny_model_dir)
    revisions = tmp_path / "revisions.jsonl"
    revise = recipe(tmp_path / "revise.yaml", {
        "model": {"name_or_path": model}, "prompts": {"file": str(prompts)}, "revisions": 1, "batch_size": 2,
        "sampling": {"num_samples": 1, "max_new_tokens": 6, "temperature": 1.0, "seed": 1},
        "output_file": str(revisions), "progress_bar": False})
    from preftune.feedback import revise as revise_module

    original, calls = revise_module.Reviser.rows, []

    def dies_on_the_second_batch(self, prompts, indices):
        calls.append(indices)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, prompts, indices)

    monkeypatch.setattr(revise_module.Reviser, "rows", dies_on_the_second_batch)
    assert main(["revise", revise]) == 130
    assert len(revisions.read_text().splitlines()) == 2  # the first batch was kept
    monkeypatch.setattr(revise_module.Reviser, "rows", original)
    assert main(["revise", revise]) == 0
    rows = [json.loads(x) for x in revisions.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and all(len(r["steps"]) == 1 for r in rows)
    assert all(r["completion"] == (r["steps"][0]["revision"] or r["initial"]) for r in rows)

    training = {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "progress_bar": False, "tensorboard": False,
                "eval_before_training": False}
    # an empty revision would be an invalid SFT row: keep the non-empty ones, as a user would filter them
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                                for r in rows if r["completion"].strip()))
    assert main(["sft", recipe(tmp_path / "sft.yaml", {
        "model": {"name_or_path": model}, "data": {"train_file": str(sft_data), "max_length": 48, "max_prompt_length": 32},
        "training": {**training, "output_dir": str(tmp_path / "sft")}})]) == 0
    samples = tmp_path / "samples.jsonl"
    assert main(["generate", recipe(tmp_path / "generate.yaml", {
        "model": {"name_or_path": str(tmp_path / "sft" / "final")}, "prompts": {"file": str(prompts)},
        "sampling": {"num_samples": 2, "max_new_tokens": 6, "temperature": 1.0, "seed": 2},
        "output_file": str(samples), "progress_bar": False})]) == 0
    pairs = tmp_path / "pairs.jsonl"
    assert main(["label", recipe(tmp_path / "label.yaml", {
        "input_file": str(samples), "output_file": str(pairs), "progress_bar": False,
        "judge": {"type": "constitution", "model": {"name_or_path": model}}})]) == 0
    labelled = [json.loads(x) for x in pairs.read_text().splitlines()]
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert labelled and all(0.5 < r["score_chosen"] < 1 and r["score_chosen"] + r["score_rejected"] == pytest.approx(1)
                            for r in labelled)
    assert summary["expected_flip_rate"] == pytest.approx(statistics.fmean(r["score_rejected"] for r in labelled))
    eps = round(summary["expected_flip_rate"], 4)
    assert main(["train", recipe(tmp_path / "rdpo.yaml", {
        "model": {"name_or_path": str(tmp_path / "sft" / "final")}, "objective": {"name": "robust", "beta": 0.1,
                                                                                  "label_smoothing": eps},
        "data": {"train_file": str(pairs), "max_length": 48, "max_prompt_length": 32},
        "training": {**training, "output_dir": str(tmp_path / "rdpo")}})]) == 0
    card = (tmp_path / "rdpo" / "final" / "README.md").read_text()
    assert f"label_smoothing: {eps}" in card
