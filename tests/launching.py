"""Launching preftune on 2 real processes (torchrun, ``accelerate launch`` with the shipped set-ups) from tests,
and comparing what they wrote with the one-process twin run in the test's own process (same global batch).
Their fixtures (``launch_pairs``, ``dpo_recipe``) are in conftest.py."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from preftune.config import config_from_dict
from preftune.training import train
from preftune.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "preftune", *args]


def accelerate_launch(*args: str, config: str | Path = "ddp.yaml") -> list[str]:
    """``accelerate launch`` on 2 processes with a shipped set-up (a name under configs/accelerate/) or a file."""
    setup = config if isinstance(config, Path) else ROOT / "configs" / "accelerate" / config
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(setup), "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "preftune", *args]


def launch(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def recipe(folder: Path, raw: dict, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def one_process(raw: dict, output_dir: Path, **training) -> list[dict]:
    """The twin run in this process: the launched run's global batch as one process's batch."""
    raw = copy.deepcopy(raw)
    raw["training"].update(output_dir=str(output_dir), batch_size=4, eval_batch_size=4, **training)
    return train(config_from_dict(raw)).history


def assert_same_rows(single: list[dict], launched: list[dict]) -> None:
    """Same rows in the same order with the same keys; every number equal to TOLERANCE (relative for
    numbers above 1 such as summed log-probs); tokens_per_second is a timing."""
    assert [r["step"] for r in launched] == [r["step"] for r in single]
    for a, b in zip(single, launched, strict=True):
        assert set(a) == set(b), (a["step"], set(a) ^ set(b))
        for key in a:
            if key != "tokens_per_second":
                assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=TOLERANCE), (a["step"], key)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=TOLERANCE, msg=name)



def kill_after_checkpoint(command: list[str], run_dir: Path, checkpoint: str, cwd: Path) -> None:
    """Start the launcher in its own process group and SIGKILL the whole group (launcher and both workers)
    as soon as ``checkpoint`` is published, in the middle of the next step."""
    process = subprocess.Popen(command, cwd=cwd, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    target, deadline = run_dir / "checkpoints" / checkpoint, time.monotonic() + 600
    try:
        while not target.exists():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()




def variant_equals_one_process(base: dict, changes: dict, folder: Path, command, steps: int) -> dict:
    """``base`` with each section of ``changes`` merged in (the objective replaced), launched by ``command`` for
    ``steps`` steps and run as the one-process twin: curve, held-out metrics and final weights (or adapter)
    equal. Returns the recipe."""
    raw = copy.deepcopy(base)
    for section, values in changes.items():
        raw[section] = values if section == "objective" else {**raw.get(section, {}), **values}
    raw["training"].update(output_dir=str(folder / "two"), max_steps=steps, save_steps=None)
    launch(command("train", str(recipe(folder, raw, "variant"))), folder)
    assert_same_rows(one_process(raw, folder / "one"), read_metrics(folder / "two"))
    name = "adapter_model.safetensors" if raw.get("lora", {}).get("enabled") else "model.safetensors"
    a, b = (load_file(str(folder / run / "final" / name)) for run in ("one", "two"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=TOLERANCE, msg=key)
    return raw
