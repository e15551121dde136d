"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``checkpoints/step-00000040`` holding the trainable weights (safetensors), the
optimizer and scheduler states, every RNG state and ``trainer_state.json`` (the data position is the step:
batches are a pure function of seed and step). It is written under a temporary name and renamed into
place, and rename is atomic, so a crash mid-write never leaves a broken latest checkpoint.

With several processes the main one writes everything shared (weights, optimizer, scheduler, state); each
process writes its own RNG streams (``rng`` for process 0, ``rng-rank<r>`` for the others) into the same
temporary folder, and the main one renames the folder only after every process has finished (a barrier):
a crash of any process before that leaves a ``.tmp-`` folder that resume ignores and the next save removes.

Under FSDP2 the weights and the optimizer's moments are shards: every process takes part in gathering them
into whole tensors and the main process writes those, so the files are the same as one process's (a run
resumes on another number of processes, sharded or not); on resume each process cuts its own shard out of
the whole tensors it read.

Nothing in a checkpoint is a pickle: a checkpoint folder may come from elsewhere (``training.resume: PATH``,
a run folder copied from someone), and unpickling runs code. Optimizer, scheduler and RNG states are JSON
plus safetensors (``state_files`` says why not ``torch.load(weights_only=True)``). Checkpoints of earlier
versions (``optimizer.pt``, ``scheduler.pt``, ``rng.pt``) are pickles: they are refused, never opened, with a
message saying how to start over. Every file is read and decoded before the model or optimizer is touched.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .distributed import ONE_PROCESS, Ranks, full_tensor, is_sharded, resharded, shard_like, whole_parameters
from .engines import (
    check_zero_checkpoint,
    full_master,
    load_zero_optimizer_state,
    zero_optimizer_state,
    zero_partitioned,
)
from .state_files import StateFileError, load_state, save_state

STEP_DIR = re.compile(r"^step-(\d{8})$")
WEIGHTS = "trainable.safetensors"
STATE_TENSORS = "objective_state.safetensors"
OPTIMIZER, SCHEDULER, RNG = "optimizer", "scheduler", "rng"  # NAME.json (+ NAME.safetensors), see state_files
LEGACY_PICKLES = ("optimizer.pt", "scheduler.pt", "rng.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: incomplete, in the old pickle format, or not preftune's."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates (all of them for full fine-tuning, the adapters with LoRA), whole
    (gathered from every process under FSDP2: a collective)."""
    return {name: full_tensor(full_master(p).detach()).contiguous().cpu()
            for name, p in resharded(model).named_parameters() if p.requires_grad}


def optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with sharded moments gathered whole (a collective under FSDP2)."""
    state = optimizer.state_dict()
    gathered = {i: {k: full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                for i, entry in sorted(state["state"].items())}
    return {**state, "state": gathered}


def shard_optimizer_state(state: dict, optimizer) -> dict:
    """The inverse of ``optimizer_state`` for this process: each moment cut as its parameter is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for i, entry in state["state"].items():
        param = params[int(i)] if int(i) < len(params) else None
        out[i] = {k: shard_like(v, param) if param is not None and isinstance(v, torch.Tensor)
                  and v.shape == param.shape else v for k, v in entry.items()}
    return {**state, "state": out}


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


def rng_file(rank: int) -> str:
    return RNG if rank == 0 else f"{RNG}-rank{rank}"


def optimizer_file(rank: int) -> str:
    """A DeepSpeed ZeRO process's own optimizer partition (every process, 0 included)."""
    return f"{OPTIMIZER}-rank{rank}"


def _fsync(files: list[Path]) -> None:
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict, keep: int | None,
    tensors: dict[str, torch.Tensor] | None = None, ranks: Ranks = ONE_PROCESS,
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` ones. Returns its folder.
    ``tensors``: extra named tensors (an objective's running statistics) restored by ``load_checkpoint``.
    Every process calls this (it waits for all of them); ``model`` etc. are read on the main one only."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if ranks.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    ranks.barrier()  # the folder exists for everyone
    _fsync(save_state(rng_state(), tmp, rng_file(ranks.rank)))
    zero = zero_partitioned(model)
    if zero:  # DeepSpeed: each process writes its own partition of the optimizer
        _fsync(save_state(zero_optimizer_state(optimizer), tmp, optimizer_file(ranks.rank)))
    if ranks.main or is_sharded(model) or zero:  # sharded: every process takes part in gathering
        weights = trainable_state(model)
        moments = None if zero else optimizer_state(optimizer)
        extra = {k: full_tensor(v).detach().cpu().contiguous() for k, v in (tensors or {}).items()}
    if ranks.main:
        save_file(weights, str(tmp / WEIGHTS))
        if moments is not None:
            save_state(moments, tmp, OPTIMIZER)
        save_state(scheduler.state_dict(), tmp, SCHEDULER)
        save_file(extra, str(tmp / STATE_TENSORS))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2), encoding="utf-8")
        _fsync([f for f in tmp.iterdir() if "-rank" not in f.name])
    ranks.barrier()  # every process's files are on disk before the folder is published
    if ranks.main:
        if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    ranks.barrier()  # nobody goes on (or reads the latest checkpoint) before it is in place
    return final


def _prune(root: Path, keep: int | None) -> None:
    for stale in root.glob(".tmp-step-*"):  # leftovers of a crash mid-write
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


def _read_states(path: Path, rank: int, zero: bool = False) -> dict:
    """Optimizer, scheduler and this process's RNG states, decoded (nothing applied yet). A process that the
    writing run did not have (resumed on more processes) continues process 0's RNG streams."""
    if not (path / f"{OPTIMIZER}.json").is_file() and any((path / name).exists() for name in LEGACY_PICKLES):
        raise CheckpointError(
            f"checkpoint {path} is in the pickle format of earlier preftune versions (optimizer.pt, scheduler.pt, "
            "rng.pt), which is not loaded because unpickling can run code; start over with training.resume: never "
            "or a new training.output_dir"
        )
    try:
        rng = rng_file(rank) if (path / f"{rng_file(rank)}.json").is_file() else RNG
        return {OPTIMIZER: load_state(path, optimizer_file(rank) if zero else OPTIMIZER),
                SCHEDULER: load_state(path, SCHEDULER), RNG: load_state(path, rng)}
    except StateFileError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {exc}") from exc


def _tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / name))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {path}: {name} is not a readable safetensors file ({exc})") from exc


def _apply(what: str, path: Path, restore, state) -> None:
    """``restore(state)``, with a state that does not fit (another optimizer, a hand-edited file) reported
    as the checkpoint's problem rather than a traceback from inside torch."""
    try:
        restore(state)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: the {what} state does not fit this run ({exc})") from exc


def _scheduler_loader(scheduler):
    """A scheduler's ``load_state_dict`` copies every key onto the scheduler object: only accept the keys it
    writes itself, so a crafted file cannot set other attributes."""
    def restore(state: dict) -> None:
        unexpected = sorted(set(state) - set(scheduler.state_dict())) if isinstance(state, dict) else ["(not a dict)"]
        if unexpected:
            raise ValueError(f"unexpected entries {unexpected[:5]}")
        scheduler.load_state_dict(state)
    return restore


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, rank: int = 0,
                    deepspeed: dict | None = None) -> dict:
    """Restore weights, optimizer, scheduler and process ``rank``'s RNG from ``path``; returns the trainer
    state. Every process reads the same shared files (they are replicas of one another), and under DeepSpeed
    its own optimizer partition (``deepspeed``: this run's ZeRO stage and process count, which must be the
    checkpoint's)."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a preftune checkpoint (no trainer_state.json)")
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    try:
        check_zero_checkpoint(path, state.get("deepspeed"), deepspeed)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    states = _read_states(path, rank, zero=deepspeed is not None)
    weights = _tensors(path, WEIGHTS)
    state["tensors"] = _tensors(path, STATE_TENSORS) if (path / STATE_TENSORS).is_file() else {}
    params = dict(resharded(model).named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"checkpoint {path} does not match this model's trainable parameters "
            f"(missing: {missing[:5]}, unexpected: {extra[:5]}); was it written with another model or LoRA setting?"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            with whole_parameters([params[name]], modify=True):  # ZeRO-3: gathered, written, split again
                params[name].copy_(shard_like(tensor.to(params[name].dtype), params[name]))
    if deepspeed is not None:
        _apply("optimizer", path, lambda s: load_zero_optimizer_state(optimizer, s), states[OPTIMIZER])
    else:
        _apply("optimizer", path, lambda s: optimizer.load_state_dict(shard_optimizer_state(s, optimizer)),
               states[OPTIMIZER])
    _apply("scheduler", path, _scheduler_loader(scheduler), states[SCHEDULER])
    _apply("RNG", path, set_rng_state, states[RNG])
    return state
