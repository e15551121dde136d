"""Two processes launched for real (torchrun and ``accelerate launch``, gloo on CPU) against one process on
the same global batch: N processes x micro-batch b x accumulation a must train what 1 process x N*b x a trains.

Every launched run uses ``training.batch_size=2`` per process (global 4); its one-process twin runs in this
process with ``batch_size=4``. Splits are chosen so that the awkward cases happen: 17 training pairs make the
fifth global micro-batch a single pair (process 1 runs a stand-in, weighted 0), and 5 held-out pairs make the
last evaluation batch a single pair too.

Why ``adam_epsilon=1e-6``: two processes add the same numbers in another order, so gradients differ from one
process's by float rounding (~1e-7 relative). Adam's first step is lr·g/(|g|+ε): for the odd weight whose
gradient is itself of order ε=1e-8 that rounding is amplified to ~lr·1e-2. A larger ε keeps the comparison
about the arithmetic of the method, which is what is tested, at the stated 1e-5.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_scheduler

from preftune.config import config_from_dict
from preftune.training import train
from preftune.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from preftune.training.logps import CompletionLogps
from preftune.training.metrics import read_metrics

from conftest import snippets, write_pairs

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "preftune", *args]


def accelerate_launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
            "--main_process_port", str(_free_port()), "-m", "preftune", *args]


def launch(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def recipe(folder: Path, raw: dict, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def one_process(raw: dict, output_dir: Path, **training) -> list[dict]:
    """The twin run in this process: the launched run's global batch as one process's batch."""
    raw = copy.deepcopy(raw)
    raw["training"].update(output_dir=str(output_dir), batch_size=4, eval_batch_size=4, **training)
    return train(config_from_dict(raw)).history


def assert_same_rows(single: list[dict], launched: list[dict]) -> None:
    """Same rows in the same order with the same keys; every number equal to TOLERANCE (relative for
    numbers above 1 such as summed log-probs); tokens_per_second is a timing."""
    assert [r["step"] for r in launched] == [r["step"] for r in single]
    for a, b in zip(single, launched, strict=True):
        assert set(a) == set(b), (a["step"], set(a) ^ set(b))
        for key in a:
            if key != "tokens_per_second":
                assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=TOLERANCE), (a["step"], key)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=TOLERANCE, msg=name)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    """17 training pairs (global micro-batches of 4, 4, 4, 4, 1) and 5 held-out pairs (batches of 4, 1)."""
    folder = tmp_path_factory.mktemp("pairs")
    rows = write_pairs(folder / "all.jsonl", 22).read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "train.jsonl").write_text("".join(rows[:17]), encoding="utf-8")
    (folder / "eval.jsonl").write_text("".join(rows[17:]), encoding="utf-8")
    return folder / "train.jsonl", folder / "eval.jsonl"


@pytest.fixture(scope="module")
def dpo_recipe(tiny_model_dir, pairs, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("dpo")
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_file": str(pairs[0]), "eval_file": str(pairs[1]), "max_length": 96, "max_prompt_length": 32},
        "objective": {"name": "dpo", "beta": 0.1},
        "reference": {"cache_dir": str(folder / "refcache")},
        "training": {"output_dir": str(folder / "two"), "batch_size": 2, "eval_batch_size": 2, "max_steps": 5,
                     "learning_rate": 1e-3, "adam_epsilon": 1e-6, "logging_steps": 1, "save_steps": 1,
                     "save_total_limit": None, "progress_bar": False, "tensorboard": False, "seed": 3},
    }


@pytest.fixture(scope="module")
def dpo_two_processes(dpo_recipe, tmp_path_factory) -> Path:
    """The 2-process DPO run (torchrun), uninterrupted."""
    folder = Path(dpo_recipe["training"]["output_dir"]).parent
    launch(torchrun("train", str(recipe(folder, dpo_recipe, "dpo"))), folder)
    return Path(dpo_recipe["training"]["output_dir"])


def test_dpo_on_two_processes_equals_one_process(dpo_two_processes, dpo_recipe, tmp_path):
    """Loss curve, every logged metric, held-out metrics before and after (5 pairs: an odd split whose last
    batch leaves process 1 without a pair) and final weights equal one process with the same global batch."""
    launched = read_metrics(dpo_two_processes)
    single = one_process(dpo_recipe, tmp_path / "one")
    assert_same_rows(single, launched)
    assert [r["step"] for r in launched if "eval/loss" in r] == [0, 5]
    assert launched[0]["eval/logps/chosen"] < -10  # real summed log-probs, not a stand-in's zeros
    assert_same_weights(tmp_path / "one", dpo_two_processes)


def test_one_writer(dpo_two_processes):
    """Files written once by the main process: one metrics row per step (no duplicates from process 1), one
    train.log start line, a checkpoint per step each holding both processes' RNG state, no leftovers."""
    rows = read_metrics(dpo_two_processes)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert (dpo_two_processes / "train.log").read_text().count("preftune train: objective dpo") == 1
    names = [p.name for p in list_checkpoints(dpo_two_processes)]
    assert names == [f"step-{s:08d}" for s in range(1, 6)]
    for checkpoint in list_checkpoints(dpo_two_processes):
        assert (checkpoint / "rng.json").is_file() and (checkpoint / "rng-rank1.json").is_file()
    assert not list((dpo_two_processes / "checkpoints").glob(".tmp-*"))
    assert (dpo_two_processes / "final" / "README.md").is_file()


def _kill_after_checkpoint(command: list[str], run_dir: Path, checkpoint: str, cwd: Path) -> None:
    """Start the launcher in its own process group and SIGKILL the whole group (launcher and both workers)
    as soon as ``checkpoint`` is published, in the middle of the next step."""
    process = subprocess.Popen(command, cwd=cwd, env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    target, deadline = run_dir / "checkpoints" / checkpoint, time.monotonic() + 600
    try:
        while not target.exists():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_sigkill_of_the_whole_job_then_the_same_command_resumes_exactly(dpo_two_processes, dpo_recipe, tmp_path):
    """Kill -9 every process right after checkpoint 2, run the same command again: it resumes from a
    checkpoint and reproduces the uninterrupted 2-process run (same processes, same reductions: to 1e-7);
    one metrics.jsonl without duplicate or missing steps; every checkpoint loads into a fresh model."""
    raw = copy.deepcopy(dpo_recipe)
    raw["training"]["output_dir"] = str(tmp_path / "run")
    command = torchrun("train", str(recipe(tmp_path, raw, "dpo")))
    _kill_after_checkpoint(command, tmp_path / "run", "step-00000002", tmp_path)
    assert not (tmp_path / "run" / "final").exists()
    launch(command, tmp_path)
    resumed, straight = read_metrics(tmp_path / "run"), read_metrics(dpo_two_processes)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 5, 5]
    assert list((tmp_path / "run").glob("metrics*")) == [tmp_path / "run" / "metrics.jsonl"]
    for a, b in zip(straight, resumed, strict=True):
        assert set(a) == set(b)
        for key in set(a) - {"tokens_per_second"}:
            assert b[key] == pytest.approx(a[key], rel=1e-7, abs=1e-7), (a["step"], key)
    for name, tensor in final_weights(dpo_two_processes).items():
        torch.testing.assert_close(final_weights(tmp_path / "run")[name], tensor, rtol=0, atol=1e-7)
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == [f"step-{s:08d}" for s in range(1, 6)]
    for checkpoint in checkpoints:
        module = CompletionLogps(AutoModelForCausalLM.from_pretrained(raw["model"]["name_or_path"]), 1024)
        optimizer = torch.optim.AdamW(module.parameters())
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=5)
        state = load_checkpoint(checkpoint, module, optimizer, scheduler, rank=1)
        assert state["step"] == int(checkpoint.name.split("-")[1])


def unpaired_files(folder: Path) -> tuple[Path, Path]:
    """18 training examples (micro-batches of 4, 4, 4, 4, 2: the last gives each process one example whose
    KL row borrows the other process's completion) and 7 held-out ones; two of three are desirable."""
    good, bad = snippets(2.0, limit=25), snippets(at_most=-2.0, limit=25)
    prompts = ["Write a movie review:", "Review this film:", "Tell me about the film:"]
    rows = [{"prompt": prompts[i % 3], "completion": " " + (good if i % 3 else bad)[i], "label": bool(i % 3)}
            for i in range(25)]
    for name, part in (("train", rows[:18]), ("eval", rows[18:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return folder / "train.jsonl", folder / "eval.jsonl"


def test_kto_batch_level_kl_on_two_processes_equals_one_process(tiny_model_dir, tmp_path):
    """KTO's reference point ẑ0 is a mean over the micro-batch's mismatched pairs: with two processes the
    pairs are drawn from, and the mean taken over, the global micro-batch (gathered with gradient), so the
    curve, ``kl``, held-out metrics and weights equal one process's. Launched with ``accelerate launch`` and
    the shipped configs/accelerate/ddp.yaml, with gradient accumulation 2 (micro-batches 4+4, 4+4, 2+4)."""
    train_file, eval_file = unpaired_files(tmp_path)
    raw = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_file": str(train_file), "eval_file": str(eval_file), "max_length": 96,
                 "max_prompt_length": 32},
        "objective": {"name": "kto", "beta": 0.1},
        "reference": {"cache_dir": str(tmp_path / "refcache")},
        "training": {"output_dir": str(tmp_path / "two"), "batch_size": 2, "eval_batch_size": 2, "max_steps": 3,
                     "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "adam_epsilon": 1e-6,
                     "logging_steps": 1, "save_steps": None, "progress_bar": False, "tensorboard": False, "seed": 3},
    }
    launch(accelerate_launch("train", str(recipe(tmp_path, raw, "kto"))), tmp_path)
    launched = read_metrics(tmp_path / "two")
    kl = [r["kl"] for r in launched if "kl" in r]
    assert kl[0] == 0 and all(z > 0.1 for z in kl[1:])  # ẑ0 = 0 while policy = reference, then a real statistic
    assert_same_rows(one_process(raw, tmp_path / "one"), launched)
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_precomputed_reference_and_beta_dpo_on_two_processes_equal_one_process(dpo_recipe, tmp_path):
    """Reference precompute split across processes and cached once (the table equals one process's), and
    β-DPO, whose batch statistics (β_batch, the running margin M0, the ρ filter's choice) must be those of
    the global micro-batch."""
    raw = copy.deepcopy(dpo_recipe)
    raw["objective"] = {"name": "beta_dpo", "beta": 0.1, "rho": 0.5}
    raw["reference"] = {"precompute": True, "cache_dir": str(tmp_path / "cache-two")}
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=3, save_steps=None)
    launch(torchrun("train", str(recipe(tmp_path, raw, "beta_dpo"))), tmp_path)
    raw["reference"]["cache_dir"] = str(tmp_path / "cache-one")
    single = one_process(raw, tmp_path / "one")
    assert_same_rows(single, read_metrics(tmp_path / "two"))
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    for name in ("cache-one", "cache-two"):
        assert len(list((tmp_path / name).iterdir())) == 2  # train and held-out tables, no temporary file
    for one, two in zip(sorted((tmp_path / "cache-one").iterdir()), sorted((tmp_path / "cache-two").iterdir()),
                        strict=True):
        assert one.name == two.name  # same key: same weights, data and precision
        a, b = load_file(str(one))["reference_logps"], load_file(str(two))["reference_logps"]
        torch.testing.assert_close(b, a, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True)


def fsdp_launch(*args: str, config: Path = ROOT / "configs" / "accelerate" / "fsdp.yaml") -> list[str]:
    """``accelerate launch`` with the shipped FSDP2 set-up (on this CPU preftune turns FSDP2 on itself: accelerate
    1.15 offers FSDP to GPU-class devices only)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_port", str(_free_port()), "-m", "preftune", *args]


def fsdp_setup(folder: Path, ram_efficient: bool) -> Path:
    """The shipped fsdp.yaml with ``fsdp_cpu_ram_efficient_loading`` set."""
    setup = (ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text(encoding="utf-8")
    assert "fsdp_cpu_ram_efficient_loading: true" in setup
    config = folder / "fsdp.yaml"
    config.write_text(setup.replace("fsdp_cpu_ram_efficient_loading: true",
                                    f"fsdp_cpu_ram_efficient_loading: {str(ram_efficient).lower()}"), encoding="utf-8")
    return config


def test_fsdp_full_fine_tuning_with_a_sharded_reference_equals_one_process(dpo_recipe, tmp_path):
    """FSDP2 over gloo, 2 processes: the policy and the frozen reference copy are sharded (each process holds
    half of every unit: checked in the log), and the loss curve, held-out metrics (odd split), final weights
    and checkpoints' optimizer moments equal one process with the same global batch. A small
    ``logps_chunk_size`` makes the processes run different numbers of LM-head chunks per batch. With
    ``fsdp_cpu_ram_efficient_loading`` (the shipped set-up) only process 0 reads the weights (the bf16 test
    below runs without it: each process reads them and keeps its shard)."""
    raw = copy.deepcopy(dpo_recipe)
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=3, save_steps=2, logps_chunk_size=16)
    launch(fsdp_launch("train", str(recipe(tmp_path, raw, "dpo"))), tmp_path)
    log = (tmp_path / "two" / "train.log").read_text()
    assert "holds 94368 of 188736 weights" in log and "reference model sharded with FSDP2" in log
    single = one_process(raw, tmp_path / "one")
    assert_same_rows(single, read_metrics(tmp_path / "two"))
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    for step in ("step-00000002", "step-00000003"):
        one = load_file(str(tmp_path / "one" / "checkpoints" / step / "optimizer.safetensors"))
        two = load_file(str(tmp_path / "two" / "checkpoints" / step / "optimizer.safetensors"))
        assert set(one) == set(two)
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=TOLERANCE, msg=name)


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
    """FSDP2, full fine-tuning with TR-DPO (the sharded reference copy mixed towards the sharded policy at
    every step): SIGKILL of the whole job right after checkpoint 2, the same command again. The checkpoint
    holds whole tensors (weights, moments, the moved reference) that each process cuts its shard from, so
    the resumed run equals one process run straight through; the checkpoints load into an unsharded model."""
    raw = copy.deepcopy(dpo_recipe)
    raw["reference"] = {"sync_steps": 1, "sync_alpha": 0.5, "cache_dir": str(tmp_path / "cache")}
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=4, save_steps=1)
    command = fsdp_launch("train", str(recipe(tmp_path, raw, "tr_dpo")))
    _kill_after_checkpoint(command, tmp_path / "two", "step-00000002", tmp_path)
    assert not (tmp_path / "two" / "final").exists()
    launch(command, tmp_path)
    assert "resumed from" in (tmp_path / "two" / "train.log").read_text()
    single = one_process(raw, tmp_path / "one")
    resumed = [r for r in read_metrics(tmp_path / "two") if r["step"] > 2 or "eval/loss" in r]
    assert_same_rows([r for r in single if r["step"] > 2 or "eval/loss" in r], resumed)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    for step in (2, 4):
        a = load_file(str(tmp_path / "one" / "checkpoints" / f"step-{step:08d}" / "objective_state.safetensors"))
        b = load_file(str(tmp_path / "two" / "checkpoints" / f"step-{step:08d}" / "objective_state.safetensors"))
        assert set(a) == set(b) and len(a) > 10  # the reference's weights
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=TOLERANCE, msg=name)
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
    and final weights (or adapter) equal."""
    raw = copy.deepcopy(dpo_recipe)
    for section, values in FSDP_VARIANTS[variant].items():
        raw[section] = values if section == "objective" else {**raw.get(section, {}), **values}
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=2, save_steps=None)
    launch(fsdp_launch("train", str(recipe(tmp_path, raw, variant))), tmp_path)
    assert_same_rows(one_process(raw, tmp_path / "one"), read_metrics(tmp_path / "two"))
    name = "adapter_model.safetensors" if "lora" in raw else "model.safetensors"
    a, b = (load_file(str(tmp_path / run / "final" / name)) for run in ("one", "two"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=TOLERANCE, msg=key)


def test_fsdp_refuses_a_token_level_objective_on_the_adapter_off_policy(dpo_recipe, tmp_path):
    """TDPO with LoRA under FSDP2 reads the adapter-off policy inside the policy's own forward, which crashed
    with a segmentation fault in torch 2.13's FSDP2 backward: stopped at start with what to do instead."""
    raw = copy.deepcopy(dpo_recipe)
    raw["objective"] = {"name": "tdpo", "beta": 0.1}
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=1)
    done = subprocess.run(fsdp_launch("train", str(recipe(tmp_path, raw, "tdpo_lora"))), cwd=tmp_path,
                          env=_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "'tdpo' reads the reference token by token" in done.stderr and "configs/accelerate/ddp.yaml" in done.stderr
    assert not list((tmp_path / "two").glob("checkpoints/step-*"))


def deepspeed_launch(*args: str, config: str = "deepspeed_zero2.yaml") -> list[str]:
    """``accelerate launch`` with a shipped DeepSpeed set-up (on this CPU preftune turns DeepSpeed on itself, as
    for FSDP2)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2",
            "--main_process_port", str(_free_port()), "-m", "preftune", *args]


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="needs deepspeed (make test installs it)")


@needs_deepspeed
def test_deepspeed_zero2_with_accumulation_killed_then_resumed_equals_one_process(dpo_recipe, tmp_path):
    """DeepSpeed ZeRO-2, 2 processes x 2 pairs x accumulation 2 against 1 process x 4 pairs x 2: preftune
    marks the step's last micro-batch as DeepSpeed's boundary (DeepSpeed reduces, clips and steps inside that
    backward). SIGKILL of the whole job after checkpoint 2, then the same command: each process reloads its
    own optimizer partition; the curve after the resume, held-out metrics, grad norms, learning rates and
    final weights equal the one-process run straight through. Resuming under another launch is refused."""
    raw = copy.deepcopy(dpo_recipe)
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=4, save_steps=1, gradient_accumulation_steps=2)
    command = deepspeed_launch("train", str(recipe(tmp_path, raw, "dpo")))
    _kill_after_checkpoint(command, tmp_path / "two", "step-00000002", tmp_path)
    launch(command, tmp_path)
    log = (tmp_path / "two" / "train.log").read_text()
    assert "DeepSpeed ZeRO-2 over 2 processes" in log and "resumed from" in log
    checkpoint = tmp_path / "two" / "checkpoints" / "step-00000004"
    assert {p.name for p in checkpoint.glob("optimizer*.json")} == {"optimizer-rank0.json", "optimizer-rank1.json"}
    single = one_process(raw, tmp_path / "one")
    resumed = [r for r in read_metrics(tmp_path / "two") if r["step"] > 2 or "eval/loss" in r]
    assert_same_rows([r for r in single if r["step"] > 2 or "eval/loss" in r], resumed)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    with pytest.raises(CheckpointError, match="DeepSpeed ZeRO-2 on 2 processes.*same launch"):
        module = CompletionLogps(AutoModelForCausalLM.from_pretrained(raw["model"]["name_or_path"]), 1024)
        optimizer = torch.optim.AdamW(module.parameters())
        load_checkpoint(checkpoint, module, optimizer, get_scheduler("linear", optimizer, 0, 4))


DEEPSPEED_VARIANTS = {
    "lora_precompute": {"lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                        "reference": {"precompute": True}},
    "tr_dpo": {"reference": {"sync_steps": 1, "sync_alpha": 0.5}},
}


@needs_deepspeed
@pytest.mark.parametrize("variant", sorted(DEEPSPEED_VARIANTS))
def test_deepspeed_zero2_variants_equal_one_process(dpo_recipe, tmp_path, variant):
    """Under DeepSpeed ZeRO-2, 2 processes x 2 pairs against 1 process x 4 pairs, 3 steps: LoRA with the
    adapter-off reference precomputed (cache written once), and TR-DPO (the reference copy follows the
    policy's working weights). Curve, held-out metrics and final weights (or adapter) equal."""
    raw = copy.deepcopy(dpo_recipe)
    for section, values in DEEPSPEED_VARIANTS[variant].items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["training"].update(output_dir=str(tmp_path / "two"), max_steps=3, save_steps=None)
    launch(deepspeed_launch("train", str(recipe(tmp_path, raw, variant))), tmp_path)
    assert_same_rows(one_process(raw, tmp_path / "one"), read_metrics(tmp_path / "two"))
    name = "adapter_model.safetensors" if "lora" in raw else "model.safetensors"
    a, b = (load_file(str(tmp_path / run / "final" / name)) for run in ("one", "two"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=TOLERANCE, msg=key)
