"""The reward-model trainer runs on the shared training loop: exact resume after a crash, gradient accumulation
equivalent to one larger batch, LoRA adapters on the backbone, the NaN guard."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from preftune.config import build_section
from preftune.feedback.judges import build_judge
from preftune.reward.train import RewardConfig, train_reward
from preftune.training import NonFiniteLossError

from test_reward import keyword_pairs, reward_config


def run(raw: dict):
    return train_reward(build_section(RewardConfig, copy.deepcopy(raw)))


def losses(run_dir) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture
def raw(tmp_path, tiny_model_dir):
    config = reward_config(tmp_path, tiny_model_dir, keyword_pairs(tmp_path / "kw.jsonl", 24), max_steps=4,
                           logging_steps=1, save_steps=2, eval_before_training=False)
    config["data"]["eval_fraction"] = 0.0
    return config


def test_a_crashed_reward_run_resumes_on_the_same_loss_curve(raw, tmp_path, monkeypatch):
    """Uninterrupted: 4 steps. Crashed: killed inside step 4 (after the step-2 checkpoint and step 3), then the
    same command again: steps 3 and 4 are recomputed from the checkpoint and every logged loss is identical."""
    from preftune.training import loop

    whole = run({**raw, "training": {**raw["training"], "output_dir": str(tmp_path / "whole")}})
    original = loop.Loop._optimizer_step

    def crash_at_step_4(self, step, stats):
        if step == 3:
            raise RuntimeError("killed")
        return original(self, step, stats)

    crashed = {**raw, "training": {**raw["training"], "output_dir": str(tmp_path / "crashed")}}
    monkeypatch.setattr(loop.Loop, "_optimizer_step", crash_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        run(crashed)
    monkeypatch.setattr(loop.Loop, "_optimizer_step", original)
    resumed = run(crashed)
    assert losses(resumed.run_dir) == losses(whole.run_dir)
    assert [s for s, _ in losses(resumed.run_dir)] == [1, 2, 3, 4]
    head = load_file(str(whole.final_dir / "reward_head.safetensors"))
    again = load_file(str(resumed.final_dir / "reward_head.safetensors"))
    assert torch.equal(head["weight"], again["weight"])


def test_accumulation_trains_what_one_larger_batch_trains(raw, tmp_path):
    """8 lists in one micro-batch == 2 micro-batches of 4 accumulated: each list weighs 1/8 either way."""
    one = {**raw, "training": {**raw["training"], "batch_size": 8, "max_steps": 2, "save_steps": None,
                               "output_dir": str(tmp_path / "one")}}
    two = copy.deepcopy(one)
    two["training"].update(batch_size=4, gradient_accumulation_steps=2, output_dir=str(tmp_path / "two"))
    a, b = run(one), run(two)
    wa = load_file(str(a.final_dir / "reward_head.safetensors"))["weight"]
    wb = load_file(str(b.final_dir / "reward_head.safetensors"))["weight"]
    assert torch.allclose(wa, wb, atol=1e-6) and not torch.equal(wa, torch.zeros_like(wa))
    assert [loss for _, loss in losses(a.run_dir)] == pytest.approx([loss for _, loss in losses(b.run_dir)], abs=1e-6)


def test_lora_trains_adapters_and_exports_a_merged_backbone(raw, tmp_path, tiny_model_dir):
    lora = {**raw, "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "training": {**raw["training"], "save_steps": 4}}
    result = run(lora)
    checkpoint = load_file(str(result.run_dir / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert all("lora_" in name or name.startswith("head.") for name in checkpoint)
    assert any("lora_A" in name for name in checkpoint) and "head.weight" in checkpoint
    # final/ holds a plain backbone (adapters merged): it differs from the base where LoRA was applied
    merged = load_file(str(result.final_dir / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))

    def weight(tensors, suffix):  # the backbone alone names its layers without the causal LM's prefix
        return next(v for k, v in tensors.items() if k.endswith(suffix))

    assert not torch.allclose(weight(merged, "layers.0.self_attn.q_proj.weight"),
                              weight(base, "layers.0.self_attn.q_proj.weight"))
    assert torch.equal(weight(merged, "layers.0.self_attn.k_proj.weight"),
                       weight(base, "layers.0.self_attn.k_proj.weight"))
    judge = build_judge({"type": "reward_model", "path": str(result.final_dir)})
    assert all(s is not None for s in judge.score(["Review:"] * 2, [" excellent", " fine"]))


def test_a_nan_reward_loss_stops_before_the_update(raw, monkeypatch):
    from preftune.reward import train as reward_train

    original = reward_train.RewardTask.loss

    def poisoned(self, module, batch, step, micro, weight, stats):
        loss, tokens = original(self, module, batch, step, micro, weight, stats)
        return (loss * float("nan") if step == 2 else loss), tokens

    monkeypatch.setattr(reward_train.RewardTask, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan.*step-00000002"):
        run(raw)


def test_ctrl_c_stops_a_reward_run_with_a_checkpoint_and_the_rerun_finishes_it(raw, tmp_path):
    """`preftune reward` under SIGINT: exit code 130 after a checkpoint (no traceback); the same command resumes
    and the logged steps run on without a gap or a repeat."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    raw = copy.deepcopy(raw)
    raw["training"].update(max_steps=400, logging_steps=1, save_steps=None, lr_scheduler="constant")
    recipe = tmp_path / "reward.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "preftune", "reward", str(recipe)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    stopped = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    done = subprocess.run(cmd + [f"training.max_steps={stopped + 2}"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [s for s, _ in losses(tmp_path / "run")] == list(range(1, stopped + 3))


def test_packed_reward_runs_equal_padded_ones(raw, tmp_path):
    """The same 4 steps with prefix-shared packing (each pair's "Review:" prompt computed once for both texts,
    no padding) and with padded batches: every logged loss equal to 1e-5, and the heads trained alike."""
    padded = run({**raw, "training": {**raw["training"], "output_dir": str(tmp_path / "padded"), "packing": "padded"}})
    shared = run({**raw, "training": {**raw["training"], "output_dir": str(tmp_path / "shared")}})
    assert [s for s, _ in losses(shared.run_dir)] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(losses(padded.run_dir), losses(shared.run_dir), strict=True):
        assert b == pytest.approx(a, abs=1e-5)
    head_a = load_file(str(padded.final_dir / "reward_head.safetensors"))["weight"]
    head_b = load_file(str(shared.final_dir / "reward_head.safetensors"))["weight"]
    torch.testing.assert_close(head_b, head_a, atol=1e-5, rtol=1e-4)


def test_group_prefixes_by_hand():
    """Texts [1 2 3 4], [1 2 5], [1 2 3 9], [7 8]; groups (0, 1) and (2, 3, absent 0): pair 0-1 shares [1 2]
    (2 tokens); text 2's real group partner 3 shares nothing (the absent slot does not count), so text 0
    keeps 2 and texts 2 and 3 get 0."""
    from preftune.reward.train import _group_prefixes

    sequences = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 9], [7, 8]]
    groups = torch.tensor([[0, 1, 0], [2, 3, 0]])
    present = torch.tensor([[True, True, False], [True, True, False]])
    assert _group_prefixes(sequences, groups, present).tolist() == [2, 2, 0, 0]
