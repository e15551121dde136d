"""What every benchmark shares: worker subprocesses, peak memory, the machine and its load, library versions."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _attended_pairs(query, key, is_causal: bool, attn_mask) -> int:
    """(query, key) pairs that take part in an attention call, per batch row and head: those its mask allows (True, or
    a finite additive bias; averaged over a mask's batch and head dimensions), the lower triangle if causal
    (top-left aligned, as PyTorch's kernels are), else all of them."""
    s_q, s_k = query.shape[-2], key.shape[-2]
    if attn_mask is not None:
        allowed = attn_mask.isfinite() if attn_mask.is_floating_point() else attn_mask
        return round(int(allowed.sum()) * s_q * s_k / attn_mask.numel())
    if is_causal:
        return sum(min(i + 1, s_k) for i in range(s_q))
    return s_q * s_k


def flop_counter():
    """``FlopCounterMode`` that also counts PyTorch's CPU flash attention, which its table leaves out (it knows
    only the GPU kernels). Per (query, key) pair that takes part, batch row and query head: 2 products of
    head-dim multiply-adds forward, 5 backward (the scores are recomputed), 2 FLOPs each. The pairs are those
    the causal structure or the mask lets through (``_attended_pairs``), not the dense square PyTorch's GPU
    formulas count: useful work, whatever the kernel spends on masked entries."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def forward(query, key, value, dropout_p=0.0, is_causal=False, attn_mask=None, *args, out_val=None, **kwargs):
        b, h, _, d = query.shape
        return 2 * 2 * b * h * _attended_pairs(query, key, is_causal, attn_mask) * d

    def backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, attn_mask=None,
                 *args, out_val=None, **kwargs):
        b, h, _, d = query.shape
        return 5 * 2 * b * h * _attended_pairs(query, key, is_causal, attn_mask) * d

    forward._get_raw = backward._get_raw = True
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def run_worker(script: str, name: str, workdir: Path, extra: list[str], threads: int) -> dict:
    """``python script --worker name --workdir workdir *extra`` in a fresh process with ``threads`` OpenMP
    threads (read when torch loads, so it must be set before); returns the JSON the worker wrote. Idle OpenMP
    threads wait as the caller's environment says, OpenMP's default (a spin of about 3 ms, then sleep) unless
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set: what a user's run gets. (Until 2026-12-03 the workers
    slept at once, ``OMP_WAIT_POLICY=PASSIVE``: preftune's SmolLM2 LoRA step, many small operations, took
    30-40% longer that way, and ``model.generate`` made 77-85 tokens/s against 99-106 with spinning threads.)"""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, script, "--worker", name, "--workdir", str(workdir), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{done.stderr[-4000:]}")
    out = workdir / f"result-{name}.json"
    result = json.loads(out.read_text(encoding="utf-8"))
    out.unlink()
    return result


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("preftune", "torch", "transformers", "trl", "peft", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def cpu_flags() -> list[str]:
    """The CPU's matrix-relevant features (AVX-512 BF16, AMX), from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2", "fma")))


def system_info(threads: int) -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads_per_system": threads, "cpu_flags": cpu_flags(),
            "native_bf16_matmul": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "OpenMP default"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "OpenMP default"),
            "load_average_at_start": os.getloadavg(), "versions": versions(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
