"""Training procedures: TR-DPO reference updates and sDPO stages."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune.config import ConfigError, config_from_dict
from preftune.trainer import train


def run(raw: dict, *overrides: str):
    return train(config_from_dict(copy.deepcopy(raw), list(overrides)))


def losses(result) -> list[float]:
    return [row["loss"] for row in result.history if "loss" in row]


@pytest.mark.parametrize("lora", [False, True], ids=["frozen-copy", "lora-adapter"])
def test_hard_sync_makes_the_next_step_start_from_log_2(base_config, tmp_path, lora):
    """TR-DPO with α = 1 every 2 steps: after the sync at step 2 the reference equals the policy, so step 3's
    DPO loss is exactly log 2 again (every log-ratio is 0), while step 2's was not."""
    raw = copy.deepcopy(base_config)
    raw["training"].update(max_steps=4, learning_rate=1e-2, save_steps=None)
    raw["reference"].update(sync_steps=2, sync_alpha=1.0)
    if lora:
        raw["lora"] = {"enabled": True, "r": 4, "alpha": 8}
        raw["training"]["learning_rate"] = 5e-2
    result = run(raw)
    curve = losses(result)
    assert curve[0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(curve[1] - math.log(2)) > 1e-4
    assert curve[2] == pytest.approx(math.log(2), abs=1e-6)
    log_text = (result.run_dir / "train.log").read_text()
    assert "reference synced with the policy after step 2 (alpha=1, sync 1)" in log_text
    assert "reference synced with the policy after step 4 (alpha=1, sync 2)" in log_text


def test_soft_sync_mixes_policy_into_reference(base_config, tiny_model_dir, tmp_path):
    """α = 0.25 at step 2: θ_ref = 0.25·θ_2 + 0.75·θ_0, checked on the checkpointed tensors."""
    raw = copy.deepcopy(base_config)
    raw["training"].update(max_steps=2, learning_rate=1e-2, save_steps=2, eval_before_training=False)
    raw["reference"].update(sync_steps=2, sync_alpha=0.25)
    result = run(raw)
    checkpoint = result.run_dir / "checkpoints" / "step-00000002"
    policy = load_file(str(checkpoint / "trainable.safetensors"))
    saved = load_file(str(checkpoint / "objective_state.safetensors"))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = 0.25 * policy[f"model.{name}"] + 0.75 * start[name]
    torch.testing.assert_close(saved[f"reference/{name}"], expected, rtol=1e-6, atol=1e-7)


def test_sync_resumes_exactly(base_config, tmp_path, monkeypatch):
    """The reference moved during training; a run crashed after the step-4 checkpoint resumes with it."""
    raw = copy.deepcopy(base_config)
    raw["training"].update(max_steps=6, save_steps=4, learning_rate=1e-2, save_total_limit=None)
    raw["reference"].update(sync_steps=3, sync_alpha=0.5)
    straight = run(raw, f"training.output_dir={tmp_path / 'a'}")
    from preftune import trainer as trainer_module

    original = trainer_module._Run._optimizer_step

    def crash(self, step, stats):
        if step == 4:
            raise RuntimeError("simulated crash")
        return original(self, step, stats)

    monkeypatch.setattr(trainer_module._Run, "_optimizer_step", crash)
    with pytest.raises(RuntimeError):
        run(raw, f"training.output_dir={tmp_path / 'b'}")
    monkeypatch.setattr(trainer_module._Run, "_optimizer_step", original)
    resumed = run(raw, f"training.output_dir={tmp_path / 'b'}")
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)


def test_sync_refuses_a_precomputed_reference(base_config):
    raw = copy.deepcopy(base_config)
    raw["reference"].update(sync_steps=2, precompute=True)
    with pytest.raises(ConfigError, match="reference.sync_steps .* cannot be precomputed"):
        config_from_dict(raw)
