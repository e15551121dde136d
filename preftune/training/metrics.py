"""Metric names users' dashboards expect (DESIGN.md), their batch statistics, and where they are written:
``metrics.jsonl`` (one JSON object per logging step) and TensorBoard events."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import write_text
from ..objectives import GroupLogps, ObjectiveOutput, PairedLogps


class MeanAccumulator:
    """Example-weighted means over several micro-batches (so 8 batches of 1 log what 1 batch of 8 logs)."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] += total
        self.counts[name] += count

    def add_mean(self, name: str, mean: float, count: float) -> None:
        self.add(name, mean * count, count)

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}

    def __bool__(self) -> bool:
        return bool(self.sums)


def _add_present(acc: MeanAccumulator, name: str, values: Tensor) -> None:
    """Mean over the entries that exist: non-pair data marks a missing chosen/rejected reward with NaN."""
    present = ~torch.isnan(values)
    if bool(present.any()):
        acc.add(name, float(values[present].sum()), float(present.sum()))


def add_batch_statistics(acc: MeanAccumulator, out: ObjectiveOutput, logps: PairedLogps | GroupLogps) -> None:
    """Accumulate the standard metrics of one micro-batch.

    ``logps/*``: policy's summed completion log-probs; ``rewards/*``: the objective's implicit reward;
    ``rewards/accuracies``: chosen reward strictly above rejected; ``logps_accuracy``: the policy alone
    prefers chosen by mean token log-prob (meaningful before training, when every reward is 0).
    """
    n = logps.batch_size
    acc.add("loss", float(out.losses.detach().float().sum()), n)
    chosen, rejected = out.chosen_rewards.float(), out.rejected_rewards.float()
    _add_present(acc, "rewards/chosen", chosen)
    _add_present(acc, "rewards/rejected", rejected)
    both = ~torch.isnan(chosen) & ~torch.isnan(rejected)
    if bool(both.any()):
        acc.add("rewards/margins", float((chosen - rejected)[both].sum()), float(both.sum()))
        acc.add("rewards/accuracies", float((chosen > rejected)[both].float().sum()), float(both.sum()))
    if isinstance(logps, GroupLogps):
        acc.add("logps/completions", float(logps.policy_logps.detach()[logps.mask].sum()), float(logps.mask.sum()))
    else:
        acc.add("logps/chosen", float(logps.policy_chosen_logps.detach().sum()), n)
        if logps.policy_rejected_logps is not None:
            acc.add("logps/rejected", float(logps.policy_rejected_logps.detach().sum()), n)
            prefers = logps.mean_logps("chosen").detach() > logps.mean_logps("rejected").detach()
            acc.add("logps_accuracy", float(prefers.float().sum()), n)
    for name, value in out.metrics.items():
        acc.add_mean(name, float(value.detach()), n)


def finite(value: Tensor | float) -> bool:
    return bool(torch.isfinite(value).all()) if isinstance(value, Tensor) else math.isfinite(value)


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and mirrors them to TensorBoard: the one place where logged rows
    leave the run (another tracker belongs here too).

    With several processes every one computes the same rows (sums reduced across processes first), and only
    the main one (``main=True``) writes: the others' writer touches no file.
    """

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool, main: bool = True):
        self.path, self.main, self.tb = Path(run_dir) / "metrics.jsonl", main, None
        if not main:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a killed run wrote after the checkpoint we resume from
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop the killed run's rows for them (and a
        row it was killed in the middle of writing). Rewritten atomically: a second kill loses nothing."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
        write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key if "/" in key else f"train/{key}", value, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a row cut short by a kill
        return None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
