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
import json
from pathlib import Path

import pytest
import torch
from launching import (
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
    torchrun,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_scheduler

from preftune.training.checkpoint import list_checkpoints, load_checkpoint
from preftune.training.logps import CompletionLogps
from preftune.training.metrics import read_metrics

from conftest import snippets

pytestmark = needs_gloo


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


def test_sigkill_of_the_whole_job_then_the_same_command_resumes_exactly(dpo_two_processes, dpo_recipe, tmp_path):
    """Kill -9 every process right after checkpoint 2, run the same command again: it resumes from a
    checkpoint and reproduces the uninterrupted 2-process run (same processes, same reductions: to 1e-7);
    one metrics.jsonl without duplicate or missing steps; every checkpoint loads into a fresh model."""
    raw = copy.deepcopy(dpo_recipe)
    raw["training"]["output_dir"] = str(tmp_path / "run")
    command = torchrun("train", str(recipe(tmp_path, raw, "dpo")))
    kill_after_checkpoint(command, tmp_path / "run", "step-00000002", tmp_path)
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


