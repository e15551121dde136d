"""Metric names users' dashboards expect (DESIGN.md), their batch statistics, and where they are written:
``metrics.jsonl`` (one JSON object per logging step) and the experiment trackers of ``training.report_to``
(TensorBoard by default; wandb, mlflow, trackio) through accelerate, under the same names."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from torch import Tensor

from ..atomic import write_text
from ..config import ConfigError, LoopConfig
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

    def state(self) -> dict:
        """The running sums, for a checkpoint: a resumed run's first logged row then covers the whole window
        the uninterrupted run's did (JSON keeps every float exactly)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    @classmethod
    def from_state(cls, state: dict | None) -> MeanAccumulator:
        acc = cls()
        for name, total in (state or {}).get("sums", {}).items():
            acc.add(name, total, state["counts"][name])
        return acc


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


TRACKERS = {  # report_to name -> (accelerate's availability check, what to pip install)
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "mlflow": ("is_mlflow_available", "mlflow-skinny"),
    "trackio": ("is_trackio_available", "trackio"),
}


def tracker_names(config: LoopConfig) -> list[str]:
    """The trackers a run reports to: ``training.report_to`` (less tensorboard with ``training.tensorboard:
    false``), each installed: accelerate would skip a missing one with a debug message, this names it."""
    import accelerate.utils

    names = [n for n in dict.fromkeys(config.report_to) if n != "tensorboard" or config.tensorboard]
    for name in names:
        check, package = TRACKERS[name]
        if not getattr(accelerate.utils, check)():
            raise ConfigError(f"config key 'training.report_to': {name} is not installed; pip install {package} "
                              "(or pip install 'preftune[trackers]' for wandb, mlflow and trackio)")
    return names


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as ``section.key`` -> a value every tracker stores (lists, maps and null as JSON)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            simple = isinstance(value, (bool, int, float, str))
            out[f"{prefix}{key}"] = value if simple else json.dumps(value)
    return out


def _tracker_kwargs(config: LoopConfig, run_dir: Path, resume_step: int | None) -> dict:
    """accelerate's init_kwargs: the run's name and folder where a tracker has them; the user's own win."""
    defaults = {"wandb": {"dir": str(run_dir), "name": run_dir.name}, "mlflow": {"run_name": run_dir.name},
                "trackio": {"name": run_dir.name}, "tensorboard": {}}
    if resume_step is not None:  # purge_step hides events a killed run wrote after the checkpoint we resume from
        defaults["tensorboard"]["purge_step"] = resume_step + 1
    return {name: {**defaults.get(name, {}), **dict(config.tracker_kwargs.get(name) or {})}
            for name in TRACKERS}


def _log_samples(tracker, step: int, rows: list[dict]) -> None:
    """Sample generations in each tracker's own form: text, a table, or a file of the run."""
    columns = ["index", "split", "prompt", "completion"]
    table = [[row[c] for c in columns] for row in rows]
    if tracker.name == "tensorboard":
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r) + " |" for r in table]
        tracker.writer.add_text("samples", "\n".join(lines), step)
        tracker.writer.flush()
    elif tracker.name == "wandb":
        tracker.log_table("samples", columns=columns, data=table, step=step)
    elif tracker.name == "trackio":
        import trackio

        tracker.run.log({"samples": trackio.Table(columns=columns, data=table)}, step=step)
    elif tracker.name == "mlflow":
        import mlflow

        mlflow.log_text("".join(json.dumps(row) + "\n" for row in rows), f"samples/step-{step:08d}.jsonl")


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` (and sample generations to ``samples.jsonl``) and reports the same
    names to the accelerator's trackers (``training.report_to``), the run's config as hyper-parameters: the one
    place where logged rows leave the run.

    With several processes every one computes the same rows (sums reduced across processes first), and only
    the main one writes: the others' writer touches no file (accelerate logs to trackers from the main one).
    """

    def __init__(self, run_dir: Path, resume_step: int | None, accelerator, config: LoopConfig):
        self.run_dir, self.accelerator, self.main = Path(run_dir), accelerator, accelerator.is_main_process
        self.path, self.samples_path = self.run_dir / "metrics.jsonl", self.run_dir / "samples.jsonl"
        if self.main:
            for path in (self.path, self.samples_path):
                if resume_step is not None:
                    _truncate_after(path, resume_step)
                elif path.exists():
                    path.unlink()
        if accelerator.log_with:
            config_file = self.run_dir / "config.yaml"
            hparams = _flat(yaml.safe_load(config_file.read_text(encoding="utf-8"))) if config_file.exists() else None
            accelerator.init_trackers(config.tracker_project, hparams,
                                      _tracker_kwargs(config, self.run_dir, resume_step))

    def write(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self.accelerator.log(values, step=row["step"])

    def write_samples(self, step: int, rows: list[dict]) -> None:
        if not self.main:
            return
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n" for row in rows)
        for tracker in self.accelerator.trackers:
            _log_samples(tracker, step, rows)

    def close(self) -> None:
        """Finish every tracker's run (not ``accelerator.end_training``, which also ends the process group)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []


def _truncate_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop the killed run's rows for them (and a row it
    was killed in the middle of writing). Rewritten atomically: a second kill loses nothing."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
    write_text(path, "".join(line + "\n" for line in kept))


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
