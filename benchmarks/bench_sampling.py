"""Sampling throughput: ``preftune generate`` (HF backend) against ``model.generate`` on SmolLM2-135M-Instruct.

    python benchmarks/bench_sampling.py [--threads 2] [--repeats 2]

Same prompts (16 chat requests, the model's chat template), batch (8 prompts), settings (4 samples per
prompt, up to 128 new tokens, temperature 0.8, top-p 1, top-k off, the model's stop tokens), fp32 weights,
each system in its own process. Tokens are generated tokens up to and including the first stop token of
each sample (what both return before padding); the clock covers every batch's sampling and detokenization,
after a short warm-up call, not model loading.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import peak_rss_mb, run_worker  # noqa: E402
from workloads import SMOLLM2  # noqa: E402

PROMPTS = [
    "Write a one-sentence review of a movie.", "Give me a short review of a film you saw recently.",
    "In one sentence, what did you think of the last movie you watched?", "Write a brief movie review.",
    "Describe a film you have seen, in a sentence.", "Recommend a comedy and say why in two sentences.",
    "What makes a thriller work? Answer briefly.", "Review a science-fiction film in three sentences.",
    "Which movie would you watch again, and why?", "Summarize the plot of a famous film in two sentences.",
    "Write a short negative review of a bad movie.", "What is your favourite animated film?",
    "Describe the best movie soundtrack you know.", "Write a tweet-length review of a documentary.",
    "Compare two films by the same director briefly.", "Explain why people love horror movies, briefly.",
]
SETTINGS = {"num_samples": 4, "max_new_tokens": 128, "temperature": 0.8, "top_p": 1.0, "top_k": 0, "seed": 0}
BATCH = 8


def run_preftune(workdir: Path) -> dict:
    from preftune.feedback import decode as decode_module
    from preftune.feedback import sampling
    from preftune.feedback.generate import GenerateConfig, PromptsConfig, generate

    counted, spans = [], []
    original_decode, original_stream = decode_module.decode_stream, sampling.HFSampler.stream

    def counting_decode(*args, **kwargs):
        for position, rows in original_decode(*args, **kwargs):
            counted.append(sum(len(row) for row in rows))
            yield position, rows

    def timed_stream(self, *args):
        inner = original_stream(self, *args)
        while True:  # the clock runs only while the sampler works, not while generate writes the file
            began = time.perf_counter()
            item = next(inner, None)
            spans.append(time.perf_counter() - began)
            if item is None:
                return
            yield item

    decode_module.decode_stream, sampling.HFSampler.stream = counting_decode, timed_stream
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:1]), encoding="utf-8")
    config = GenerateConfig(prompts=PromptsConfig(file=str(prompts)), backend="hf", batch_size=BATCH,
                            output_file=str(workdir / f"warmup-{time.time_ns()}.jsonl"), progress_bar=False)
    config.model.name_or_path = SMOLLM2
    config.sampling.max_new_tokens = 4
    generate(config)  # warm-up: one prompt, 4 tokens
    counted.clear()
    spans.clear()
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    config.output_file = str(workdir / f"generations-{time.time_ns()}.jsonl")  # fresh: nothing to resume
    for key, value in SETTINGS.items():
        setattr(config.sampling, key, value)
    generate(config)
    seconds = sum(spans)
    return {"tokens": sum(counted), "seconds": seconds, "tokens_per_second": sum(counted) / seconds,
            "peak_rss_mb": peak_rss_mb()}


def run_transformers(workdir: Path) -> dict:
    import torch

    from preftune import modeling
    from preftune.config import ModelConfig
    from preftune.feedback.sampling import encode_prompt, stop_token_ids

    model = modeling.load_causal_lm(SMOLLM2, ModelConfig()).eval()
    tokenizer = modeling.load_tokenizer(SMOLLM2)
    stops, pad = stop_token_ids(model, tokenizer), tokenizer.pad_token_id

    def sample(prompt_ids: list[list[int]], max_new_tokens: int) -> int:
        width = max(len(p) for p in prompt_ids)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=SETTINGS["temperature"], top_p=SETTINGS["top_p"], top_k=SETTINGS["top_k"],
                             num_return_sequences=SETTINGS["num_samples"], pad_token_id=pad, eos_token_id=stops,
                             repetition_penalty=1.0)
        rows = out[:, width:].tolist()
        tokenizer.batch_decode(rows, skip_special_tokens=True)
        return sum(next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in rows)

    encoded = [encode_prompt(tokenizer, p, True) for p in PROMPTS]
    with torch.no_grad():
        sample(encoded[:1], 4)  # warm-up
        torch.manual_seed(SETTINGS["seed"])
        began, tokens = time.perf_counter(), 0
        for start in range(0, len(encoded), BATCH):
            tokens += sample(encoded[start : start + BATCH], SETTINGS["max_new_tokens"])
        seconds = time.perf_counter() - began
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds, "peak_rss_mb": peak_rss_mb()}


WORKERS = {"preftune": run_preftune, "transformers": run_transformers}


def compare(threads: int, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in WORKERS}
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        for repeat in range(repeats):
            for name in list(WORKERS) if repeat % 2 == 0 else list(WORKERS)[::-1]:
                print(f"  sampling {name} (repeat {repeat + 1}/{repeats}) ...", flush=True)
                runs[name].append(run_worker(__file__, name, Path(tmp), [], threads))
    out = {"settings": f"{len(PROMPTS)} prompts, batch {BATCH}, K={SETTINGS['num_samples']}, "
                       f"{SETTINGS['max_new_tokens']} new tokens, T={SETTINGS['temperature']}", "runs": runs}
    for name, results in runs.items():
        out[name] = {"tokens_per_second": statistics.median(r["tokens_per_second"] for r in results),
                     "tokens": statistics.median(r["tokens"] for r in results)}
    out["speedup"] = out["preftune"]["tokens_per_second"] / out["transformers"]["tokens_per_second"]
    out["speedup_per_repeat"] = [p["tokens_per_second"] / t["tokens_per_second"]
                                 for p, t in zip(runs["preftune"], runs["transformers"], strict=True)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](args.workdir)
        (args.workdir / f"result-{args.worker}.json").write_text(json.dumps(result), encoding="utf-8")
        return 0
    print(json.dumps(compare(args.threads, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
