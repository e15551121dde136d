"""DPO training throughput and peak memory: preftune vs TRL's DPOTrainer on one fixed CPU workload.

    python benchmarks/bench_dpo.py [--steps 20] [--warmup 3] [--precision fp32|bf16] [--batch-size 8]

Workload (fixed): a 4-layer Llama (hidden 256, 16k vocabulary, so the LM head is half the weights, as in
small real models), pairs of a 64-token prompt and two 96-token completions cut from the bundled movie
snippets, a frozen reference copy of the starting weights, DPO with beta 0.1, AdamW, linear schedule.
Every pair has *exactly* the same token counts under both frameworks' tokenization (checked), so a batch
has no padding and both process the same tokens per step, whatever order they draw the pairs in.

Each framework runs in its own subprocess, so its peak resident memory (ru_maxrss) is its own. Throughput
is tokens / second over the steps after ``--warmup``, timed between the ends of optimizer steps (data
collation, forward, backward and the optimizer step all included), where tokens are the non-padding tokens
of the batch's sequences: (prompt + chosen) + (prompt + rejected), BOS and EOS included.
Results go to ``benchmarks/results/dpo_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "dpo_cpu.json"
VOCAB, HIDDEN, LAYERS, HEADS = 16384, 256, 4, 4
PROMPT_TOKENS, COMPLETION_TOKENS = 64, 96
BETA, LEARNING_RATE = 0.1, 1e-5
# Per sequence: BOS + prompt + completion + EOS; a pair is two sequences (chosen and rejected).
TOKENS_PER_PAIR = 2 * (1 + PROMPT_TOKENS + COMPLETION_TOKENS + 1)
MAX_LENGTH = TOKENS_PER_PAIR  # never truncates


# ------------------------------------------------------------------ workload (parent process)


def _snippet_stream(seed: int) -> list[str]:
    from preftune.testing import RESOURCES

    lines = (RESOURCES / "movie_review_snippets.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t", 2)[2].strip() for line in lines]
    random.Random(seed).shuffle(texts)
    return texts


def _exact_piece(tokenizer, texts: list[str], start: int, n: int, lead: str = "", suffix: str = "") -> str | None:
    """``lead`` + snippets from ``start`` on, cut to exactly ``n`` tokens with ``suffix`` included; None when
    the cut does not survive decode -> encode unchanged."""
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    text, i = lead + texts[start % len(texts)], start + 1
    while len(encode(text)) < n + 8:
        text += " " + texts[i % len(texts)]
        i += 1
    piece = tokenizer.decode(encode(text)[: n - len(encode(suffix))]) + suffix
    return piece if len(encode(piece)) == n and piece.startswith(lead) else None


def build_pairs(tokenizer, count: int, seed: int = 0) -> list[dict]:
    """``count`` text pairs whose prompt (ending in ":") and completions (starting with a space) have exactly
    PROMPT_TOKENS / COMPLETION_TOKENS tokens, and whose boundary does not merge under BPE."""
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    texts = _snippet_stream(seed)
    pairs, cursor = [], 0
    while len(pairs) < count:
        cursor += 7
        prompt = _exact_piece(tokenizer, texts, cursor, PROMPT_TOKENS, suffix="\nReview:")
        chosen = _exact_piece(tokenizer, texts, cursor + 2, COMPLETION_TOKENS, lead=" ")
        rejected = _exact_piece(tokenizer, texts, cursor + 4, COMPLETION_TOKENS, lead=" ")
        if None in (prompt, chosen, rejected):
            continue
        if all(encode(prompt + c) == encode(prompt) + encode(c) for c in (chosen, rejected)):
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def prepare(workdir: Path, pairs: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(vocab_size=VOCAB)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    rows = build_pairs(tokenizer, pairs)
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ------------------------------------------------------------------ workers (one subprocess each)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _summary(step_ends: list[float], warmup: int, batch_size: int) -> dict:
    measured = len(step_ends) - warmup
    seconds = step_ends[-1] - step_ends[warmup - 1] if warmup else step_ends[-1] - step_ends[0]
    steps = measured if warmup else measured - 1
    tokens = steps * batch_size * TOKENS_PER_PAIR
    return {"measured_steps": steps, "seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "seconds_per_step": seconds / steps, "peak_rss_mb": _peak_rss_mb()}


def run_preftune(args, workdir: Path) -> dict:
    from preftune import training
    from preftune.config import config_from_dict
    from preftune.training import loop as trainer_module

    step_ends, step_tokens = [], []
    original = trainer_module.Loop._optimizer_step

    def timed(self, step, stats):  # the loop's own step, timed at its end
        tokens = original(self, step, stats)
        step_ends.append(time.perf_counter())
        step_tokens.append(tokens)
        return tokens

    trainer_module.Loop._optimizer_step = timed
    total = args.warmup + args.steps
    config = config_from_dict({
        "model": {"name_or_path": str(workdir / "model")},
        "data": {"train_file": str(workdir / "pairs.jsonl"), "max_length": MAX_LENGTH, "max_prompt_length": 128},
        "objective": {"name": "dpo", "beta": BETA},
        "reference": {"cache_dir": str(workdir / "refcache")},
        "training": {"output_dir": str(workdir / "preftune-run"), "batch_size": args.batch_size,
                     "max_steps": total, "learning_rate": LEARNING_RATE, "logging_steps": total,
                     "save_steps": None, "eval_before_training": False, "progress_bar": False,
                     "tensorboard": False, "precision": args.precision, "seed": 0},
    })
    training.train(config)
    expected = args.batch_size * TOKENS_PER_PAIR
    if any(t != expected for t in step_tokens):
        raise RuntimeError(f"preftune processed {step_tokens} tokens per step, expected {expected}")
    return _summary(step_ends, args.warmup, args.batch_size)


def run_trl(args, workdir: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    step_ends = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step
            step_ends.append(time.perf_counter())

    total = args.warmup + args.steps
    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    config = trl.DPOConfig(
        output_dir=str(workdir / "trl-run"), per_device_train_batch_size=args.batch_size, max_steps=total,
        learning_rate=LEARNING_RATE, beta=BETA, max_length=MAX_LENGTH, logging_steps=total, report_to="none",
        save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_dropout=True,
        # TRL defaults to bf16 and gradient checkpointing; match preftune's settings (and optimizer) instead.
        bf16=args.precision == "bf16", gradient_checkpointing=False, optim="adamw_torch",
        lr_scheduler_type="linear", max_grad_norm=1.0,
    )
    model_dir = workdir / "model"
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Timer()])
    lengths = {len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["prompt_ids"]) + len(r["rejected_ids"])
               for r in trainer.train_dataset}
    if lengths != {TOKENS_PER_PAIR}:
        raise RuntimeError(f"TRL tokenized pairs to {sorted(lengths)} tokens, expected {TOKENS_PER_PAIR}")
    trainer.train()
    return _summary(step_ends, args.warmup, args.batch_size)


WORKERS = {"preftune": run_preftune, "trl": run_trl}


# ------------------------------------------------------------------ driver


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("preftune", "torch", "transformers", "trl", "peft", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _run_worker(name: str, args, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--precision", args.precision, "--batch-size", str(args.batch_size)]
    env = dict(os.environ)
    if args.threads:  # OpenMP reads this when torch loads, before any code of ours could set it
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"running {name} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{done.stderr[-4000:]}")
    return json.loads((workdir / f"result-{name}.json").read_text(encoding="utf-8"))


def _trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per framework (default: torch's choice, one per core); 1 gives "
                             "stable numbers on a machine other jobs are using, where spinning OpenMP threads stall")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.warmup < 1:
        parser.error("need --steps >= 2 and --warmup >= 1")

    if args.worker:  # inside a subprocess: run one framework, write its numbers
        result = WORKERS[args.worker](args, args.workdir)
        (args.workdir / f"result-{args.worker}.json").write_text(json.dumps(result), encoding="utf-8")
        return 0

    frameworks = ["preftune"] + (["trl"] if _trl_available() else [])
    load_at_start = os.getloadavg()[0]  # recorded because other busy processes distort every number here
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.batch_size * (args.steps + args.warmup))
        results = {name: _run_worker(name, args, workdir) for name in frameworks}
    report = {
        "workload": {"model": f"Llama hidden={HIDDEN} layers={LAYERS} heads={HEADS} vocab={VOCAB}",
                     "prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                     "tokens_per_pair": TOKENS_PER_PAIR, "batch_size_pairs": args.batch_size,
                     "precision": args.precision, "measured_steps": args.steps, "warmup_steps": args.warmup,
                     "objective": f"dpo beta={BETA}", "reference": "frozen copy"},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads or __import__("torch").get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_at_start": load_at_start},
        "versions": _versions(),
        "results": results,
    }
    if "trl" in results:
        p, t = results["preftune"], results["trl"]
        report["ratios_preftune_over_trl"] = {
            "tokens_per_second": p["tokens_per_second"] / t["tokens_per_second"],
            "peak_rss": p["peak_rss_mb"] / t["peak_rss_mb"],
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _print_table(results, report.get("ratios_preftune_over_trl"), args.output)
    return 0


def _print_table(results: dict, ratios: dict | None, output: Path) -> None:
    print(f"\n{'framework':10s} {'tokens/s':>10s} {'s/step':>8s} {'peak RSS MB':>12s}")
    for name, r in results.items():
        print(f"{name:10s} {r['tokens_per_second']:10.0f} {r['seconds_per_step']:8.3f} {r['peak_rss_mb']:12.0f}")
    if ratios:
        print(f"preftune / trl: tokens/s x{ratios['tokens_per_second']:.2f}, peak RSS x{ratios['peak_rss']:.2f}")
    print(f"written: {output}")


if __name__ == "__main__":
    sys.exit(main())
