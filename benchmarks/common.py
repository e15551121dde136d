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


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def run_worker(script: str, name: str, workdir: Path, extra: list[str], threads: int) -> dict:
    """``python script --worker name --workdir workdir *extra`` in a fresh process with ``threads`` OpenMP
    threads (read when torch loads, so it must be set before); returns the JSON the worker wrote."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning threads stall when other jobs share the cores
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
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE (workers)"),
            "load_average_at_start": os.getloadavg(), "versions": versions(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
