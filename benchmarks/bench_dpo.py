"""DPO training, preftune vs TRL's DPOTrainer, side by side on one workload (``workloads.py``).

    python benchmarks/bench_dpo.py --workload tiny-8k --precision fp32 [--threads 2] [--repeats 2]

Each system runs in its own subprocess (so peak resident memory, ``ru_maxrss``, is its own: imports and
model copies included), on the same model weights, pairs, batch (8 pairs), precision, objective (DPO,
beta 0.1), reference (a frozen copy; LoRA: the policy with adapters off, in both), optimizer (AdamW, linear
schedule, clipping at 1.0), no gradient checkpointing (TRL's default is turned off), nothing precomputed.
``bf16`` is bf16 autocast over fp32 master weights in both. The clock is the interval between optimizer
steps: from the end of the last warm-up step to the end of the last step, so collation, the reference, the
policy's forward and backward, clipping and the optimizer step all count. Repeats alternate which system
runs first; the ratio is of the median seconds per step. Writes JSON (``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import flop_counter, peak_rss_mb, run_worker, system_info  # noqa: E402
from workloads import BF16_STEPS, BF16_WARMUP, LORA_TARGETS, WORKLOADS, Workload, prepare  # noqa: E402

BETA, LEARNING_RATE, MAX_LENGTH = 0.1, 1e-5, 1200


def _summary(step_ends: list[float], step_tokens: list[int], warmup: int) -> dict:
    steps = len(step_ends) - warmup
    seconds = step_ends[-1] - step_ends[warmup - 1]
    tokens = sum(step_tokens[warmup:]) if step_tokens else None
    return {"measured_steps": steps, "seconds_per_step": seconds / steps, "peak_rss_mb": peak_rss_mb(),
            "tokens_per_second": tokens / seconds if tokens else None, "step_tokens": step_tokens}


def run_preftune(args, workdir: Path, workload: Workload) -> dict:
    from preftune import training
    from preftune.config import config_from_dict
    from preftune.training import loop as loop_module

    step_ends, step_tokens, flops = [], [], {}
    original = loop_module.Loop._optimizer_step

    def timed(self, step, stats):  # the loop's own step, timed at its end; one warm-up step counts FLOPs
        if step == 0:
            counter = flop_counter()
            with counter:
                tokens = original(self, step, stats)
            flops.update(step=counter.get_total_flops(), tokens=tokens)
        else:
            tokens = original(self, step, stats)
        step_ends.append(time.perf_counter())
        step_tokens.append(tokens)
        return tokens

    loop_module.Loop._optimizer_step = timed
    total = workload.warmup + workload.steps
    raw = {
        "model": {"name_or_path": args.model},
        "data": {"train_file": str(workdir / "pairs.jsonl"), "max_length": MAX_LENGTH, "max_prompt_length": 600},
        "objective": {"name": "dpo", "beta": BETA},
        "reference": {"cache_dir": str(workdir / "refcache")},
        "training": {"output_dir": str(workdir / "preftune-run"), "batch_size": args.batch_size, "max_steps": total,
                     "learning_rate": LEARNING_RATE, "logging_steps": total, "save_steps": None,
                     "eval_before_training": False, "progress_bar": False, "tensorboard": False,
                     "precision": args.precision, "seed": 0, "packing": args.packing,
                     "resume": "never"},  # each repeat trains from the start in the same folder
    }
    if workload.lora:
        raw["lora"] = {"enabled": True, "r": 16, "alpha": 32, "target_modules": LORA_TARGETS}
        raw["training"]["learning_rate"] = 3e-4
    training.train(config_from_dict(raw))
    result = _summary(step_ends, step_tokens, workload.warmup)
    if workload.tokens_per_pair and any(t != args.batch_size * workload.tokens_per_pair for t in step_tokens):
        raise RuntimeError(f"preftune processed {step_tokens} tokens per step, expected "
                           f"{args.batch_size * workload.tokens_per_pair}")
    result.update(flops_first_step=flops["step"], flops_per_token=flops["step"] / flops["tokens"])
    return result


def run_trl(args, workdir: Path, workload: Workload) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    step_ends = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step
            step_ends.append(time.perf_counter())

    total = workload.warmup + workload.steps
    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    config = trl.DPOConfig(
        output_dir=str(workdir / "trl-run"), per_device_train_batch_size=args.batch_size, max_steps=total,
        learning_rate=3e-4 if workload.lora else LEARNING_RATE, beta=BETA, max_length=MAX_LENGTH,
        logging_steps=total, report_to="none", save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_dropout=True,
        # TRL defaults to bf16 and gradient checkpointing; match preftune's settings (and optimizer) instead.
        bf16=args.precision == "bf16", gradient_checkpointing=False, optim="adamw_torch",
        lr_scheduler_type="linear", max_grad_norm=1.0,
    )
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    kwargs = {}
    if workload.lora:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                           task_type="CAUSAL_LM", bias="none")
    else:
        kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = trl.DPOTrainer(model=policy, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(args.model), callbacks=[Timer()], **kwargs)
    flops = {}
    original_step = trainer.training_step

    def counted_step(*step_args, **step_kwargs):  # the first (warm-up) step's FLOPs: reference, forward, backward
        if flops:
            return original_step(*step_args, **step_kwargs)
        counter = flop_counter()
        with counter:
            out = original_step(*step_args, **step_kwargs)
        flops["step"] = counter.get_total_flops()
        return out

    trainer.training_step = counted_step
    if workload.tokens_per_pair:
        lengths = {len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["prompt_ids"]) + len(r["rejected_ids"])
                   for r in trainer.train_dataset}
        if lengths != {workload.tokens_per_pair}:
            raise RuntimeError(f"TRL tokenized pairs to {sorted(lengths)} tokens, expected {workload.tokens_per_pair}")
    trainer.train()
    return {**_summary(step_ends, [], workload.warmup), "flops_first_step": flops.get("step")}


WORKERS = {"preftune": run_preftune, "trl": run_trl}


def compare(workload: Workload, precision: str, threads: int, repeats: int, batch_size: int = 8,
            packing: str = "prefix_shared") -> dict:
    """Both systems ``repeats`` times (alternating which goes first) on one workload; medians and ratios."""
    from common import trl_available

    if precision == "bf16" and workload.model == "tiny":
        workload = dataclasses.replace(workload, steps=BF16_STEPS, warmup=BF16_WARMUP)
    systems = ["preftune"] + (["trl"] if trl_available() else [])
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory(prefix=f"bench-{workload.name}-") as tmp:
        workdir = Path(tmp)
        model = prepare(workdir, workload, batch_size)
        for repeat in range(repeats):
            for name in systems if repeat % 2 == 0 else systems[::-1]:
                extra = ["--workload", workload.name, "--precision", precision, "--batch-size", str(batch_size),
                         "--model", str(model), "--packing", packing, "--steps", str(workload.steps),
                         "--warmup", str(workload.warmup)]
                print(f"  {workload.name} {precision} {name} (repeat {repeat + 1}/{repeats}) ...", flush=True)
                runs[name].append(run_worker(__file__, name, workdir, extra, threads))
    out = {"workload": workload.describe(), "precision": precision, "batch_size_pairs": batch_size, "runs": runs}
    for name, results in runs.items():
        out[name] = {key: statistics.median(r[key] for r in results)
                     for key in ("seconds_per_step", "peak_rss_mb")}
        out[name]["tokens_per_second"] = (statistics.median(r["tokens_per_second"] for r in results)
                                          if results[0].get("tokens_per_second") else None)
    if "trl" in runs:
        out["speedup"] = out["trl"]["seconds_per_step"] / out["preftune"]["seconds_per_step"]
        out["memory_ratio"] = out["preftune"]["peak_rss_mb"] / out["trl"]["peak_rss_mb"]
        out["speedup_per_repeat"] = [t["seconds_per_step"] / p["seconds_per_step"]
                                     for p, t in zip(runs["preftune"], runs["trl"], strict=True)]
        p_flops, t_flops = runs["preftune"][0]["flops_first_step"], runs["trl"][0]["flops_first_step"]
        if p_flops and t_flops:  # how much of the speedup is fewer FLOPs (tiny workloads: all batches alike)
            out["flops_ratio_trl_over_preftune"] = t_flops / p_flops
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny-8k")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads per system")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--packing", default="prefix_shared", help="preftune's training.packing")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]
    if args.steps:
        workload = dataclasses.replace(workload, steps=args.steps, warmup=args.warmup)
    if args.worker:  # inside a subprocess: one system, its numbers to a file
        result = WORKERS[args.worker](args, args.workdir, workload)
        (args.workdir / f"result-{args.worker}.json").write_text(json.dumps(result), encoding="utf-8")
        return 0
    report = {"machine": system_info(args.threads),
              "result": compare(workload, args.precision, args.threads, args.repeats, args.batch_size, args.packing)}
    report["machine"]["load_average_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2) + "\n"
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
