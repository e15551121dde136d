"""`preftune eval` never compares a model with itself by accident: the reference is reference.name_or_path,
else the one recorded in final/preftune_config.yaml, else an adapter's base; a full model with none of
these is an error naming the key. Adapters saved by preftune load from any working directory."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from preftune import modeling
from preftune.cli import main
from preftune.config import ModelConfig


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def last_eval(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval/loss" in row][-1]


def test_a_fine_tuned_model_is_compared_with_the_model_it_started_from(base_config, tmp_path):
    """Full fine-tuning: final/ is a plain model folder. With no reference set, eval reads the starting
    model from final/preftune_config.yaml and reproduces the trainer's last held-out evaluation (compared
    with itself, every reward would be 0 and the loss log 2 instead)."""
    path = write_config(tmp_path / "run.yaml", base_config)
    assert main(["train", str(path), "training.max_steps=2"]) == 0
    final = Path(base_config["training"]["output_dir"]) / "final"
    assert main(["eval", str(path), f"model.name_or_path={final}", f"training.output_dir={tmp_path / 'eval'}"]) == 0
    metrics = json.loads(next((tmp_path / "eval").glob("eval-*.json")).read_text())
    after = last_eval(final.parent)
    assert abs(after["eval/rewards/margins"]) > 1e-4
    for key in ("eval/loss", "eval/rewards/margins", "eval/rewards/chosen"):
        assert metrics[key] == pytest.approx(after[key], abs=1e-5)


def test_a_full_model_with_no_reference_is_an_error_before_any_model_loads(base_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(modeling, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    path = write_config(tmp_path / "run.yaml", base_config)
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "'reference.name_or_path'" in err[0] and "is a full model with no preftune_config.yaml" in err[0]
    assert "set reference.name_or_path to the model training started from" in err[0]


def test_a_recorded_reference_that_is_gone_is_an_error_naming_it(base_config, tmp_path, capsys):
    """The run trained against a copy of the tiny model that has since been deleted."""
    moved = shutil.copytree(base_config["model"]["name_or_path"], tmp_path / "start")
    raw = copy.deepcopy(base_config)
    raw["model"]["name_or_path"] = str(moved)
    path = write_config(tmp_path / "run.yaml", raw)
    assert main(["train", str(path), "training.max_steps=1"]) == 0
    shutil.rmtree(moved)
    final = Path(raw["training"]["output_dir"]) / "final"
    assert main(["eval", str(path), f"model.name_or_path={final}",
                 f"training.output_dir={tmp_path / 'eval'}"]) == 2
    err = capsys.readouterr().err
    assert f"says the model was trained against {moved}, which does not exist here" in err
    assert "set reference.name_or_path" in err


def test_a_lora_adapter_trained_from_a_relative_path_loads_from_another_directory(base_config, tmp_path, monkeypatch):
    """Train with the base given relative to the working directory; then, from elsewhere, peft loads
    final/ on its own (the base is recorded as an absolute path) and `preftune eval` runs with the base as
    the adapter-off reference, reproducing the trainer's last evaluation."""
    from peft import AutoPeftModelForCausalLM

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(base_config["model"]["name_or_path"], work / "models" / "tiny")
    elsewhere.mkdir()
    raw = copy.deepcopy(base_config)
    raw["model"]["name_or_path"] = "models/tiny"
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    raw["training"].update(output_dir="run", max_steps=2, learning_rate=1e-2)
    monkeypatch.chdir(work)
    assert main(["train", str(write_config(tmp_path / "run.yaml", raw))]) == 0
    final = work / "run" / "final"
    monkeypatch.chdir(elsewhere)
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((work / "models" / "tiny").resolve())
    assert AutoPeftModelForCausalLM.from_pretrained(final) is not None
    raw["model"]["name_or_path"] = str(final)
    assert main(["eval", str(write_config(tmp_path / "eval.yaml", raw)), "training.output_dir=eval"]) == 0
    metrics = json.loads(next((elsewhere / "eval").glob("eval-*.json")).read_text())
    assert metrics["eval/loss"] == pytest.approx(last_eval(work / "run")["eval/loss"], abs=1e-5)


def test_an_adapter_naming_its_base_relative_to_itself_loads_from_anywhere(base_config, tmp_path, monkeypatch):
    """An adapter folder moved together with its base, its base written relative to the adapter folder:
    preftune's loaders find the base from any working directory, and the model is the same as peft's
    loaded with the absolute path."""
    from peft import AutoPeftModelForCausalLM

    raw = copy.deepcopy(base_config)
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    raw["training"].update(max_steps=1, learning_rate=1e-2)
    assert main(["train", str(write_config(tmp_path / "run.yaml", raw))]) == 0
    bundle = tmp_path / "bundle"
    shutil.copytree(raw["model"]["name_or_path"], bundle / "base")
    adapter = shutil.copytree(Path(raw["training"]["output_dir"]) / "final", bundle / "adapters" / "dpo")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = "../../base"
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert modeling.adapter_base(adapter) == str((bundle / "base").resolve())
    ours = modeling.load_merged(str(adapter), ModelConfig())
    monkeypatch.chdir(adapter)  # where peft resolves the relative base itself
    theirs = AutoPeftModelForCausalLM.from_pretrained(".").merge_and_unload()
    ids = torch.tensor([[0, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-6)
