"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``checkpoints/step-00000040`` holding the trainable weights (safetensors), the
optimizer and scheduler states, every RNG state and ``trainer_state.json`` (the data position is the step:
batches are a pure function of seed and step). It is written under a temporary name and renamed into
place, and rename is atomic, so a crash mid-write never leaves a broken latest checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

STEP_DIR = re.compile(r"^step-(\d{8})$")
WEIGHTS = "trainable.safetensors"
STATE_TENSORS = "objective_state.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates (all of them for full fine-tuning, the adapters with LoRA)."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict, keep: int | None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` ones. Returns its folder.
    ``tensors``: extra named tensors (an objective's running statistics) restored by ``load_checkpoint``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / WEIGHTS))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    save_file({k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}, str(tmp / STATE_TENSORS))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2), encoding="utf-8")
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int | None) -> None:
    for stale in root.glob(".tmp-step-*"):  # leftovers of a crash mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    if keep:
        for old in list_checkpoints(root.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns the trainer state."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a preftune checkpoint (no trainer_state.json)")
    weights = load_file(str(path / WEIGHTS))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"checkpoint {path} does not match this model's trainable parameters "
            f"(missing: {missing[:5]}, unexpected: {extra[:5]}); was it written with another model or LoRA setting?"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    tensors = path / STATE_TENSORS
    state["tensors"] = load_file(str(tensors)) if tensors.is_file() else {}
    return state
