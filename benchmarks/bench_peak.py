"""Matmul peak of this machine, the fraction of it a SmolLM2 LoRA bf16 step reaches, and where bf16 time goes.

    python benchmarks/bench_peak.py [--threads 2]             # the peaks (fp32 and bf16 GEMM)
    python benchmarks/bench_peak.py --profile [--threads 2]   # one SmolLM2 LoRA step, op by op
    python benchmarks/bench_peak.py --run smollm2.json          # the fraction a bench_dpo.py SmolLM2 run reached

How FLOPs are counted: ``torch.utils.flop_counter.FlopCounterMode`` over one whole optimizer step of the
preftune SmolLM2 run (the reference's forward, the policy's forward and backward: every matrix product
and attention kernel, 2 FLOPs per multiply-add, nothing for elementwise ops; PyTorch's counter has no
formula for the CPU attention kernels, ``common.flop_counter`` adds one that counts the (query, key) pairs
the causal structure or mask lets through), divided by that step's tokens; the achieved rate is that per-token count times the measured tokens per second. The peak is the
best of several large square GEMMs (up to 2048^3) in the dtype the step's matmul kernels actually run in: bf16
where the CPU has bf16 matrix units, fp32 where preftune emulates bf16 kernels on fp32 units
(``preftune/training/precision.py``). Both peaks are reported, and the fp32 one through oneDNN too (what
preftune's fp32 runs multiply linear layers with on x86 CPUs, ``preftune/training/kernels.py``).
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

from common import run_worker  # noqa: E402

SIZE = 2048


def gemm_peak(dtype_name: str, seconds: float = 3.0, onednn: bool = False) -> float:
    """GFLOP/s of the best of repeated square GEMMs in ``dtype_name`` for about ``seconds``; the size doubles
    from 256 up to 2048 while one product takes under 0.3 s (bf16 without bf16 units is very slow).
    ``onednn``: fp32 products through preftune's oneDNN kernels (``kernels.OnednnProducts``)."""
    import torch

    if onednn:
        from preftune.training.kernels import OnednnProducts

        with OnednnProducts():
            return gemm_peak(dtype_name, seconds)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    def timed(size: int) -> float:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        began = time.perf_counter()
        a @ b
        return time.perf_counter() - began

    size = 256
    while size < SIZE and timed(size) < 0.3 / 8:
        size *= 2
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        began = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - began) / 1e9)
    return best


def run_peaks(workdir: Path) -> dict:
    import torch

    from preftune.training.kernels import onednn_fp32
    from preftune.training.precision import native_bf16_matmul

    return {"fp32": gemm_peak("fp32"), "bf16": gemm_peak("bf16"), "native_bf16": native_bf16_matmul("cpu"),
            "fp32_onednn": gemm_peak("fp32", onednn=True) if onednn_fp32("cpu") else None,
            "threads": torch.get_num_threads()}


def fraction_of_peak(smollm2: dict | None, threads: int) -> dict | None:
    """The SmolLM2 LoRA bf16 run's achieved GFLOP/s (at the median tokens/s of its repeats) against the peak its
    kernels run at, measured now; the peaks alone without a run."""
    with tempfile.TemporaryDirectory(prefix="bench-peak-") as tmp:
        peaks = run_worker(__file__, "peaks", Path(tmp), [], threads)
    out = {"fp32_peak_gflops": peaks["fp32"], "fp32_onednn_peak_gflops": peaks.get("fp32_onednn"),
           "bf16_peak_gflops": peaks["bf16"], "native_bf16": peaks["native_bf16"]}
    if not smollm2:
        return out
    runs = smollm2["runs"]["preftune"]
    flops_per_token = runs[0]["flops_per_token"]  # every repeat trains on the same batches
    achieved = flops_per_token * statistics.median(run["tokens_per_second"] for run in runs) / 1e9
    peak = peaks["bf16"] if peaks["native_bf16"] else peaks["fp32"]
    out.update(achieved_gflops=achieved, flops_per_token=flops_per_token,
               kernels_run_in="bf16" if peaks["native_bf16"] else "fp32 (emulated bf16 kernels)",
               fraction_of_peak=achieved / peak, fraction_of_bf16_peak=achieved / peaks["bf16"],
               fraction_of_peak_per_repeat=[flops_per_token * run["tokens_per_second"] / 1e9 / peak for run in runs])
    return out


def profile_step(pairs: int = 2) -> None:
    """One forward + backward of SmolLM2 with LoRA on ``pairs`` demo pairs, bf16 autocast, four ways: PyTorch's
    own bf16 kernels, attention emulated on fp32 units (preftune's choice with AVX-512-BF16 and no AMX), every
    bf16 kernel emulated (its choice without bf16 units), and fp32; wall time and the top operators."""
    import contextlib

    import torch
    from torch.profiler import profile
    from workloads import LORA_TARGETS, SMOLLM2

    from preftune import modeling
    from preftune.config import LoraConfig, ModelConfig
    from preftune.training.logps import completion_logps
    from preftune.training.precision import (
        EmulatedBf16Attention,
        EmulatedBf16Matmuls,
        prepare_for_bf16,
        restore_frozen_linears,
    )

    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (2 * pairs, 100))
    attention, completion = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 40:] = True
    ids[pairs:, :40] = ids[:pairs, :40]  # chosen and rejected share the 40-token prompt
    model = modeling.add_lora(modeling.load_causal_lm(SMOLLM2, ModelConfig()),
                              LoraConfig(enabled=True, r=16, alpha=32, target_modules=LORA_TARGETS))
    prepare_for_bf16(model)
    ways = (("native bf16 kernels", True, contextlib.nullcontext),
            ("bf16 attention emulated", True, EmulatedBf16Attention),
            ("every bf16 kernel emulated", True, EmulatedBf16Matmuls), ("fp32", False, contextlib.nullcontext))
    for name, bf16, kernels in ways:
        if not bf16:  # fp32 throughout: the frozen weights back in fp32 (no autocast to meet bf16 ones)
            restore_frozen_linears(model, torch.float32)
        with profile() as prof:
            began = time.perf_counter()
            with kernels():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = completion_logps(model, ids, attention, completion)
                out.sums.sum().backward()
            elapsed = time.perf_counter() - began
        print(f"\n== {name}: {elapsed:.2f} s forward + backward ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--run", type=Path, help="a bench_dpo.py --workload smollm2-lora --output file: the fraction of "
                        "the peak (measured now) its preftune runs reached")
    parser.add_argument("--worker", choices=["peaks"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        (args.workdir / "result-peaks.json").write_text(json.dumps(run_peaks(args.workdir)), encoding="utf-8")
        return 0
    if args.profile:
        import torch

        torch.set_num_threads(args.threads)
        profile_step()
        return 0
    run = json.loads(args.run.read_text(encoding="utf-8"))["result"] if args.run else None
    print(json.dumps(fraction_of_peak(run, args.threads), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
