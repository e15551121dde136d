"""``preftune zephyr`` on tiny models: the teacher's answers become the SFT data, two models' answers are pooled
and judged best vs random with each row naming its model, DPO starts from (and refers to) the dSFT model; a
rerun trains nothing; the presets load (tests/test_config.py loads every recipe under configs/, sub-folders too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from preftune.config import ConfigError, build_section
from preftune.experiments.zephyr import ZephyrConfig, load_zephyr_config, run_zephyr

ROOT = Path(__file__).resolve().parents[2]


def settings(tmp_path: Path, student: Path, teacher: Path) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a fruit.", "Say hello.", "Count to three."]))
    training = {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "tensorboard": False, "eval_before_training": False}
    return {"output_dir": str(tmp_path / "out"), "student": {"name_or_path": str(student)},
            "teacher": {"name_or_path": str(teacher)}, "sft_prompts": {"file": str(prompts)},
            "preference_prompts": {"file": str(prompts)},
            "teacher_sampling": {"num_samples": 1, "max_new_tokens": 6, "batch_size": 3},
            "pool_sampling": {"num_samples": 2, "max_new_tokens": 6, "batch_size": 3},
            "judge": {"type": "function", "function": "builtins:len"},
            "sft": {"data": {"max_length": 48, "max_prompt_length": 32}, "training": training},
            "dpo": {"objective": {"name": "dpo", "beta": 0.1}, "data": {"max_length": 48, "max_prompt_length": 32},
                    "training": training},
            "progress_bar": False}


def test_the_chain_on_tiny_models(tmp_path, tiny_model_dir, other_model_dir, monkeypatch):
    config = build_section(ZephyrConfig, settings(tmp_path, tiny_model_dir, other_model_dir))
    result = run_zephyr(config)
    out = tmp_path / "out"
    teacher = [json.loads(x) for x in (out / "teacher" / "samples.jsonl").read_text().splitlines()]
    assert all(r["model"] == str(other_model_dir) for r in teacher)
    sft_rows = [json.loads(x) for x in (out / "sft_data.jsonl").read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in sft_rows] == [c for r in teacher for c in r["completions"] if c.strip()]
    assert sft_rows[0]["messages"][0] == {"role": "user", "content": "Name a fruit."}  # the chat template's user turn
    pool = {name: [json.loads(x) for x in (out / "pool" / name / "samples.jsonl").read_text().splitlines()]
            for name in ("sft", "teacher")}
    assert pool["sft"][0]["model"] == str(out / "sft" / "final")
    owner = {c: r["model"] for rows in pool.values() for r in rows for c in r["completions"]}
    pairs = [json.loads(x) for x in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and result["pairs"]["rows_written"] == len(pairs)
    for pair in pairs:
        chosen, rejected = pair["chosen"][-1]["content"], pair["rejected"][-1]["content"]
        assert len(chosen) > len(rejected)  # the judge: length; best vs a random one scored below it
        assert owner[chosen] in pair["chosen_model"].split(",") and owner[rejected] in pair["rejected_model"].split(",")
        texts = [c for rows in pool.values() for r in rows if r["prompt"] == pair["prompt"] for c in r["completions"]]
        assert len(chosen) == max(len(t) for t in texts)
    dpo_config = yaml.safe_load((out / "dpo" / "config.yaml").read_text())
    assert dpo_config["model"]["name_or_path"] == str(out / "sft" / "final")
    assert dpo_config["reference"]["name_or_path"] is None and dpo_config["objective"]["beta"] == 0.1

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr("preftune.training.run.train_run", refuse)
    monkeypatch.setattr("preftune.feedback.sampling.load_for_sampling", refuse)
    assert run_zephyr(config)["dpo"] == result["dpo"]


@pytest.mark.parametrize("name", ["zephyr", "zephyr_gpu"])
def test_presets_load(name):
    config = load_zephyr_config(ROOT / "configs" / "zephyr" / f"{name}.yaml")
    assert "sft" in config.pool and config.dpo["objective"] == {"name": "dpo", "beta": 0.1}


def test_config_errors_name_the_key(tmp_path, tiny_model_dir):
    values = settings(tmp_path, tiny_model_dir, tiny_model_dir)
    values["pool"] = ["sft"]
    values["pool_sampling"]["num_samples"] = 1
    path = tmp_path / "z.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match="a preference needs two completions per prompt"):
        load_zephyr_config(path)
