"""The GPU check: a few steps of each GPU code path on SmolLM2-135M-Instruct, with tokens/s and peak memory.

    python scripts/gpu_check.py [--steps 20] [--out runs/gpu_check]     # on a machine with a CUDA GPU
    python scripts/gpu_check.py --cpu-dry-run                           # the same script on a tiny model

Runs, in order (each a real ``preftune`` training run on demo pairs built from the bundled movie reviews):

1. ``dpo-bf16-full``: DPO, full fine-tune, bf16 autocast over fp32 weights, frozen reference copy;
2. ``qlora-dpo-bf16``: DPO with QLoRA (NF4 base, double quantization, bf16 compute, LoRA r=16 on every
   projection), reference = adapters off;
3. ``dpo-fp16-lora``: DPO with LoRA under fp16 autocast and its gradient scaler;
4. sampling from run 1's ``final/`` with the Hugging Face backend, and with vLLM when it is importable.

For each: wall time, tokens/s (training: the loop's own count of non-padding tokens over optimizer-step
time; sampling: generated tokens over generation time) and peak GPU memory (``torch.cuda.max_memory_allocated``,
reset before each run). The checks printed beside them: step 1's DPO loss is log 2 (policy == reference),
every loss is finite. Everything is written to ``<out>/gpu_check.json``; the exit status is 1 if a check failed.

``--cpu-dry-run`` runs the same code on a tiny random Llama on the CPU for 2 steps each, so the script itself
is tested where no GPU is: there fp16 must be refused (accelerate has no CPU gradient scaler) and vLLM is
skipped. Sized to finish in well under 8 minutes on one GPU (the first run also converts the built-in model).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

MODEL = "builtin:SmolLM2-135M-Instruct"
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Write a one-sentence review of a movie.", "Give me a short review of a film you saw recently.",
           "In one sentence, what did you think of the last movie you watched?", "Write a brief movie review."]


def training_runs(steps: int) -> dict[str, dict]:
    """name -> the config keys that differ from the common recipe (``recipe``)."""
    lora = {"enabled": True, "r": 16, "alpha": 32, "target_modules": ALL_PROJECTIONS}
    return {
        "dpo-bf16-full": {"training": {"precision": "bf16", "learning_rate": 5e-7}},
        "qlora-dpo-bf16": {"model": {"quantization": "4bit"}, "lora": lora,
                           "training": {"precision": "bf16", "learning_rate": 2e-4}},
        "dpo-fp16-lora": {"lora": lora, "training": {"precision": "fp16", "learning_rate": 2e-4}},
    }


def recipe(model: str, train_file: Path, eval_file: Path, out: Path, name: str, steps: int, changes: dict) -> dict:
    raw = {
        "model": {"name_or_path": model},
        "data": {"train_file": str(train_file), "eval_file": str(eval_file), "max_length": 128, "max_prompt_length": 64},
        "objective": {"name": "dpo", "beta": 0.1},
        "reference": {"cache_dir": str(out / "refcache")},
        "training": {"output_dir": str(out / name), "resume": "never", "batch_size": 8, "eval_batch_size": 16,
                     "max_steps": steps, "lr_scheduler": "constant", "logging_steps": 1, "save_steps": None,
                     "save_total_limit": 1, "progress_bar": False, "tensorboard": False, "seed": 0},
    }
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return raw


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def train_once(name: str, raw: dict) -> dict:
    """One training run; its numbers and checks (or, for fp16 on a CPU, that it was refused)."""
    from preftune.config import ConfigError, config_from_dict
    from preftune.training import train

    reset_peak()
    began = time.perf_counter()
    try:
        result = train(config_from_dict(raw))
    except ConfigError as exc:
        refused = raw["training"]["precision"] == "fp16" and not torch.cuda.is_available()
        return {"run": name, "refused": str(exc), "ok": refused and "fp16 needs a GPU" in str(exc)}
    losses = [row["loss"] for row in result.history if "loss" in row]
    return {
        "run": name, "seconds": round(time.perf_counter() - began, 1),
        "tokens_per_second": round(result.tokens_per_second, 1), "peak_gib": peak_gib(),
        "first_loss": losses[0], "last_loss": losses[-1],
        "eval_accuracy_after": (result.eval_after or {}).get("eval/rewards/accuracies"),
        "final_dir": str(result.final_dir),
        "ok": abs(losses[0] - math.log(2)) < 1e-3 and all(math.isfinite(x) for x in losses),
    }


def sample_once(backend: str, model: str, max_new_tokens: int) -> dict:
    """Runs in a child process (a fresh CUDA context, so vLLM can take its share of GPU memory)."""
    from preftune.config import ModelConfig
    from preftune.feedback.sampling import (
        HFSampler,
        SamplingConfig,
        VLLMSampler,
        encode_prompt,
        load_for_sampling,
        load_tokenizer_for,
    )

    reset_peak()
    sampling = SamplingConfig(num_samples=4, max_new_tokens=max_new_tokens, temperature=1.0, seed=0)
    tokenizer = load_tokenizer_for(model)
    ids = [encode_prompt(tokenizer, prompt, use_template=True) for prompt in PROMPTS * 4]
    if backend == "vllm":
        sampler = VLLMSampler(model, ModelConfig(), sampling)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        sampler = HFSampler(load_for_sampling(model, ModelConfig()).to(device), tokenizer, sampling)
    began = time.perf_counter()
    texts = sampler.sample(ids, list(range(len(ids))))
    seconds = time.perf_counter() - began
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for per_prompt in texts for t in per_prompt)
    row = {"run": f"sample-{backend}", "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 1),
           "completions": sum(len(p) for p in texts), "peak_gib": peak_gib(),
           "ok": all(len(p) == sampling.num_samples for p in texts)}
    if backend == "vllm":  # vLLM allocates in its own engine process and reserves gpu_memory_utilization up front
        free, total = torch.cuda.mem_get_info()
        row.update(peak_gib=(total - free) / 2**30, note="device memory in use (vLLM reserves its KV cache up front)")
    return row


def sample_in_child(backend: str, model: str, max_new_tokens: int) -> dict:
    command = [sys.executable, __file__, "--sample", backend, "--model", model, "--max-new-tokens", str(max_new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"run": f"sample-{backend}", "ok": False, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def setup(dry_run: bool, out: Path, steps: int) -> tuple[str, Path, Path]:
    """(model, train file, eval file): the built-in model, or a tiny random Llama for the dry run."""
    from preftune.experiments.demo import build_demo_pairs

    train_file, eval_file = build_demo_pairs(out / "data", seed=0, n_train=8 * steps, n_eval=32)
    if not dry_run:
        from preftune.assets import resolve_model_path

        return resolve_model_path(MODEL), train_file, eval_file
    from preftune.testing import save_tiny_model

    return str(save_tiny_model(out / "tiny-llama")), train_file, eval_file


def report(rows: list[dict]) -> str:
    lines = [f"{'run':18s} {'ok':>3s} {'seconds':>8s} {'tokens/s':>10s} {'peak GiB':>9s}  notes"]
    for row in rows:
        peak = row.get("peak_gib")
        notes = row.get("refused") or row.get("skipped") or row.get("error") or row.get("note") or (
            f"loss {row['first_loss']:.4f} -> {row['last_loss']:.4f}" if "first_loss" in row else "")
        lines.append(f"{row['run']:18s} {'yes' if row['ok'] else 'NO':>3s} {row.get('seconds', '-')!s:>8s} "
                     f"{row.get('tokens_per_second', '-')!s:>10s} {f'{peak:.2f}' if peak is not None else '-':>9s}  "
                     f"{str(notes)[:90]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model on the CPU, 2 steps per run")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (default 20)")
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--sample", choices=["hf", "vllm"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sample:
        print(json.dumps(sample_once(args.sample, args.model, args.max_new_tokens)))
        return 0
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("no CUDA GPU is visible: run with --cpu-dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    steps = args.steps or (2 if args.cpu_dry_run else 20)
    out = Path(args.out)
    model, train_file, eval_file = setup(args.cpu_dry_run, out, steps)
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (dry run)'}; model: {model}")
    rows = [train_once(name, recipe(model, train_file, eval_file, out, name, steps, changes))
            for name, changes in training_runs(steps).items()]
    trained = rows[0].get("final_dir") or model
    max_new_tokens = 8 if args.cpu_dry_run else 64
    rows.append(sample_in_child("hf", trained, max_new_tokens))
    if vllm_importable() and torch.cuda.is_available():
        rows.append(sample_in_child("vllm", trained, max_new_tokens))
    else:
        rows.append({"run": "sample-vllm", "ok": True, "skipped": "vllm not importable or no GPU"})
    print(report(rows))
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
