"""Sharding engines on 2 real CPU processes (gloo) against one process on the same global batch: FSDP2 and
DeepSpeed ZeRO-2 through ``accelerate launch`` with the shipped set-ups (preftune turns both on for CPU
processes, which accelerate 1.15 offers them to GPU-class devices only). See test_multiprocess.py for why
``adam_epsilon=1e-6`` and the tolerance."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from launching import (
    ROOT,
    TOLERANCE,
    accelerate_launch,
    assert_same_rows,
    assert_same_weights,
    final_weights,
    kill_after_checkpoint,
    launch,
    needs_gloo,
    one_process,
    recipe,
    variant_equals_one_process,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_scheduler

from preftune.training.checkpoint import CheckpointError, load_checkpoint
from preftune.training.logps import CompletionLogps
from preftune.training.metrics import read_metrics

pytestmark = needs_gloo


def fsdp_launch(*args: str, config: str | Path = "fsdp.yaml") -> list[str]:
    return accelerate_launch(*args, config=config)


def fsdp_setup(folder: Path, ram_efficient: bool) -> Path:
    """The shipped fsdp.yaml with ``fsdp_cpu_ram_efficient_loading`` set."""
    setup = (ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text(encoding="utf-8")
    assert "fsdp_cpu_ram_efficient_loading: true" in setup
    config = folder / "fsdp.yaml"
    config.write_text(setup.replace("fsdp_cpu_ram_efficient_loading: true",
                                    f"fsdp_cpu_ram_efficient_loading: {str(ram_efficient).lower()}"), encoding="utf-8")
    return config


@pytest.mark.parametrize("save", ["adapter", "merged"])
def test_fsdp_lora_with_precompute_and_samples_equals_one_process(dpo_recipe, tmp_path, save):
    """FSDP2 with LoRA: the reference is the sharded policy with adapters off; its precompute runs stand-in
    batches in step with the other process (17 pairs: the last global batch holds one); greedy samples at
    each evaluation come from both processes' collective forwards. Curve, held-out metrics, samples, the
    cached reference table and ``final/`` (the adapter, or the merged model: merged from the gathered
    adapter on a fresh base) equal one process's."""
    raw = copy.deepcopy(dpo_recipe)
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "save": save}
    raw["reference"] = {"precompute": True, "cache_dir": str(tmp_path / "cache-two")}
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=3, save_steps=None, eval_steps=2,
                           sample_prompts=2, sample_max_new_tokens=6, learning_rate=1e-2)
    launch(fsdp_launch("train", str(recipe(tmp_path, raw, "dpo_lora"))), tmp_path)
    raw["reference"]["cache_dir"] = str(tmp_path / "cache-one")
    single = one_process(raw, tmp_path / "one")
    assert_same_rows(single, read_metrics(tmp_path / "two"))
    samples = [(tmp_path / name / "samples.jsonl").read_text(encoding="utf-8") for name in ("one", "two")]
    assert samples[0] == samples[1] and samples[0].count("\n") == 6  # 2 prompts at steps 0, 2, 3
    if save == "merged":
        assert_same_weights(tmp_path / "one", tmp_path / "two")
        start = AutoModelForCausalLM.from_pretrained(raw["model"]["name_or_path"]).state_dict()
        merged = final_weights(tmp_path / "two")
        assert (merged["model.layers.0.self_attn.q_proj.weight"] - start["model.layers.0.self_attn.q_proj.weight"]
                ).abs().max() > 1e-4  # the adapter is in the weights
    else:
        a = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
        assert set(a) == set(b) and any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=TOLERANCE, msg=name)
    tables = [sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("cache-one", "cache-two")]
    assert tables[0] == tables[1] and len(tables[0]) == 2  # same keys: the weights digest gathers the shards
    for name in tables[0]:
        a, b = (load_file(str(tmp_path / d / name))["reference_logps"] for d in ("cache-one", "cache-two"))
        torch.testing.assert_close(b, a, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True)


def test_fsdp_tr_dpo_killed_then_resumed_equals_one_process(dpo_recipe, tmp_path):
    """FSDP2 over gloo, full fine-tuning with TR-DPO: the policy and the frozen reference copy are sharded
    (each process holds half of every unit: checked in the log) and the reference is mixed towards the policy
    at every step, shard by shard. A small ``logps_chunk_size`` makes the processes run different numbers of
    LM-head chunks per batch. SIGKILL of the whole job right after checkpoint 2, the same command again. The
    checkpoint holds whole tensors (weights, Adam moments, the moved reference) that each process cuts its
    shard from, so the resumed run (curve, held-out metrics on the odd split, final weights, moments and the
    reference in checkpoints) equals one process run straight through with the same global batch; the
    checkpoints load into an unsharded model. Launched with the shipped ``fsdp_cpu_ram_efficient_loading``
    (only process 0 reads the weights; the bf16 test below runs without it)."""
    raw = copy.deepcopy(dpo_recipe)
    raw["reference"] = {"sync_steps": 1, "sync_alpha": 0.5, "cache_dir": str(tmp_path / "cache")}
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=4, save_steps=1, logps_chunk_size=16)
    command = fsdp_launch("train", str(recipe(tmp_path, raw, "tr_dpo")))
    kill_after_checkpoint(command, tmp_path / "two", "step-00000002", tmp_path)
    assert not (tmp_path / "two" / "final").exists()
    launch(command, tmp_path)
    log = (tmp_path / "two" / "train.log").read_text()
    assert "resumed from" in log and "holds 94368 of 188736 weights" in log
    assert "reference model sharded with FSDP2" in log
    single = one_process(raw, tmp_path / "one")
    resumed = [r for r in read_metrics(tmp_path / "two") if r["step"] > 2 or "eval/loss" in r]
    assert_same_rows([r for r in single if r["step"] > 2 or "eval/loss" in r], resumed)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    for step in (2, 4):
        for name, rtol in (("objective_state", 0.0), ("optimizer", 1e-4)):  # the moved reference; Adam moments
            a = load_file(str(tmp_path / "one" / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors"))
            b = load_file(str(tmp_path / "two" / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors"))
            assert set(a) == set(b) and len(a) > 10
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=TOLERANCE, msg=key)
        module = CompletionLogps(AutoModelForCausalLM.from_pretrained(raw["model"]["name_or_path"]), 1024)
        optimizer = torch.optim.AdamW(module.parameters())
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=4)
        state = load_checkpoint(tmp_path / "two" / "checkpoints" / f"step-{step:08d}", module, optimizer, scheduler)
        assert state["step"] == step and len(optimizer.state) == len(list(module.parameters()))


def test_fsdp_bf16_keeps_summed_log_probs_in_fp32(dpo_recipe, tmp_path):
    """FSDP2 in bf16 gathers and multiplies the weights in bf16 but returns each unit's output and reduces
    gradients in fp32. accelerate's own FSDP2 bf16 policy casts outputs to bf16 too: a summed log-prob of
    ~-260 nats would come back in bf16 steps of 2 nats (an eval/logps/chosen such as -258.8), and policy and
    reference, cast at different places, would disagree before any update (measured: eval rewards 0.029 and
    accuracy 1.0 at step 0). Here, at step 0: rewards exactly 0 (policy = reference), and the held-out
    log-probs within 0.02 nat of one process's bf16 run. Launched without ``fsdp_cpu_ram_efficient_loading``."""
    raw = copy.deepcopy(dpo_recipe)
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=1, save_steps=None, precision="bf16")
    launch(fsdp_launch("train", str(recipe(tmp_path, raw, "dpo_bf16")), config=fsdp_setup(tmp_path, False)), tmp_path)
    launched = read_metrics(tmp_path / "two")[0]
    single = one_process(raw, tmp_path / "one")[0]
    assert launched["step"] == single["step"] == 0
    assert launched["eval/rewards/chosen"] == launched["eval/rewards/rejected"] == 0.0
    for key in ("eval/logps/chosen", "eval/logps/rejected"):
        assert launched[key] == pytest.approx(single[key], abs=0.02), key  # measured: 2e-4 apart


FSDP_VARIANTS = {
    # a token-level reference inside the policy's forward (a separate sharded copy); activation
    # checkpointing recomputes sharded units in the backward; SFT has no reference
    "tdpo_checkpointing": {"objective": {"name": "tdpo", "beta": 0.1}, "model": {"gradient_checkpointing": True}},
    "sft": {"objective": {"name": "sft"}},
}


@pytest.mark.parametrize("variant", sorted(FSDP_VARIANTS))
def test_fsdp_variants_equal_one_process(dpo_recipe, tmp_path, variant):
    """Under FSDP2, 2 processes x 2 pairs against 1 process x 4 pairs, 2 steps: curve, held-out metrics
    and final weights equal."""
    variant_equals_one_process(dpo_recipe, FSDP_VARIANTS[variant], tmp_path, fsdp_launch, steps=2)


TOKEN_LEVEL_REFUSALS = {
    # TDPO with LoRA under FSDP2 reads the adapter-off policy inside the policy's own forward, which crashed with
    # a segmentation fault in torch 2.13's FSDP2 backward (2 processes, gloo)
    "fsdp_lora": ("is_fsdp2", {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                  "'tdpo' reads the reference token by token.*configs/accelerate/ddp.yaml"),
    # under ZeRO-3 it reads the split reference outside that engine's own forward, where DeepSpeed keeps its
    # bookkeeping
    "zero3": ("zero3_launch", {"enabled": False}, "'tdpo' reads the reference token by token.*ZeRO-3.*fsdp.yaml"),
}


@pytest.mark.parametrize("case", sorted(TOKEN_LEVEL_REFUSALS))
def test_a_token_level_objective_is_refused_where_its_reference_cannot_run(dpo_recipe, tmp_path, monkeypatch, case):
    """TDPO with LoRA under FSDP2, and TDPO under DeepSpeed ZeRO-3: stopped before the model loads, with what
    to launch instead. Checked in this process with the run's accelerator seen as that engine."""
    from preftune.config import config_from_dict
    from preftune.training import preference, train

    engine_check, lora, message = TOKEN_LEVEL_REFUSALS[case]
    raw = copy.deepcopy(dpo_recipe)
    raw["objective"] = {"name": "tdpo", "beta": 0.1}
    raw["lora"] = lora
    raw["training"].update(output_dir=str(tmp_path / "run"), max_steps=1)
    monkeypatch.setattr(preference, engine_check, lambda accelerator: True)
    loaded = []
    monkeypatch.setattr(preference.modeling, "load_policy", lambda config: loaded.append(config))
    with pytest.raises(ValueError, match=message):
        train(config_from_dict(raw))
    assert not loaded


def deepspeed_launch(*args: str, config: str | Path = "deepspeed_zero2.yaml") -> list[str]:
    return accelerate_launch(*args, config=config)


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="needs deepspeed (make test installs it)")


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_with_accumulation_killed_then_resumed_equals_one_process(dpo_recipe, tmp_path, stage):
    """DeepSpeed ZeRO-2 and ZeRO-3 (the shipped set-ups), TR-DPO (the reference copy follows the policy every
    step), 2 processes x 2 pairs x accumulation 2 against 1 process x 4 pairs x 2: preftune marks the step's
    last micro-batch as DeepSpeed's boundary (DeepSpeed reduces, clips and steps inside that backward).
    Under ZeRO-3 the policy is loaded already split (transformers under DeepSpeed's ``zero.Init``) and the
    reference copy is loaded and split the same way (process 0 holds half of each: checked in the log); TR-DPO mixes them parameter by
    parameter, gathered. SIGKILL of the whole job after checkpoint 2, then the same command: each process
    reloads its own optimizer partition and the moved reference; the curve after the resume, held-out
    metrics, grad norms, learning rates and final weights equal the one-process run straight through.
    Resuming under another launch is refused."""
    raw = copy.deepcopy(dpo_recipe)
    raw["reference"] = {"sync_steps": 1, "sync_alpha": 0.5, "cache_dir": str(tmp_path / "cache")}
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=4, save_steps=1, gradient_accumulation_steps=2)
    command = deepspeed_launch("train", str(recipe(tmp_path, raw, "tr_dpo")), config=f"deepspeed_zero{stage}.yaml")
    kill_after_checkpoint(command, tmp_path / "two", "step-00000002", tmp_path)
    launch(command, tmp_path)
    log = (tmp_path / "two" / "train.log").read_text()
    assert f"DeepSpeed ZeRO-{stage} over 2 processes" in log and "resumed from" in log
    if stage == 3:
        assert "process 0 holds 94368 of 188736 weights" in log and "reference model split with DeepSpeed" in log
    checkpoint = tmp_path / "two" / "checkpoints" / "step-00000004"
    assert {p.name for p in checkpoint.glob("optimizer*.json")} == {"optimizer-rank0.json", "optimizer-rank1.json"}
    single = one_process(raw, tmp_path / "one")
    resumed = [r for r in read_metrics(tmp_path / "two") if r["step"] > 2 or "eval/loss" in r]
    assert_same_rows([r for r in single if r["step"] > 2 or "eval/loss" in r], resumed)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    moved = (load_file(str(tmp_path / run / "checkpoints" / "step-00000004" / "objective_state.safetensors"))
             for run in ("one", "two"))
    for (key, a), b in zip(*(sorted(m.items()) for m in moved), strict=True):  # the reference, moved 4 times
        torch.testing.assert_close(b[1], a, rtol=0, atol=TOLERANCE, msg=key)
    with pytest.raises(CheckpointError, match=f"DeepSpeed ZeRO-{stage} on 2 processes.*same launch"):
        module = CompletionLogps(AutoModelForCausalLM.from_pretrained(raw["model"]["name_or_path"]), 1024)
        optimizer = torch.optim.AdamW(module.parameters())
        load_checkpoint(checkpoint, module, optimizer, get_scheduler("linear", optimizer, 0, 4))


@needs_deepspeed
def test_deepspeed_zero3_lora_with_precompute_and_samples_equals_one_process(dpo_recipe, tmp_path):
    """DeepSpeed ZeRO-3 with LoRA: the reference is the split policy with adapters off, precomputed with stand-in batches in step (17 pairs:
    the last global batch holds one); greedy samples at each evaluation come from both processes' collective
    forwards. 2 processes x 2 pairs against 1 process x 4 pairs, 3 steps: curve, held-out metrics, samples,
    the cached reference table and the merged ``final/`` (from the gathered adapter) equal."""
    raw = copy.deepcopy(dpo_recipe)
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "save": "merged"}
    raw["reference"] = {"precompute": True, "cache_dir": str(tmp_path / "cache-two")}
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=3, save_steps=None, eval_steps=2,
                           sample_prompts=2, sample_max_new_tokens=6, learning_rate=1e-2)
    launch(deepspeed_launch("train", str(recipe(tmp_path, raw, "lora")), config="deepspeed_zero3.yaml"), tmp_path)
    assert "reference log-probs precomputed" in (tmp_path / "two" / "train.log").read_text()
    raw["reference"]["cache_dir"] = str(tmp_path / "cache-one")
    single = one_process(raw, tmp_path / "one")
    assert_same_rows(single, read_metrics(tmp_path / "two"))
    samples = [(tmp_path / run / "samples.jsonl").read_text(encoding="utf-8") for run in ("one", "two")]
    assert samples[0] == samples[1] and samples[0].count("\n") == 6  # 2 prompts at steps 0, 2, 3
    tables = [sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("cache-one", "cache-two")]
    assert tables[0] == tables[1] and len(tables[0]) == 2  # same keys: the weights digest gathers the partitions
    for name in tables[0]:
        a, b = (load_file(str(tmp_path / d / name))["reference_logps"] for d in ("cache-one", "cache-two"))
        torch.testing.assert_close(b, a, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
