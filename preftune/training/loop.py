"""The one training loop. Whatever it trains (a policy under a preference objective, a reward model) is a
``Task``; the loop owns what every run needs the same way: the optimizer and schedule, gradient accumulation
weighted per example, clipping, the NaN guard, logging, periodic evaluation, atomic checkpoints with exact
resume, Ctrl-C, and the final export.

Read ``Loop.fit`` top to bottom: resume, evaluate, then for each optimizer step run its micro-batches, clip,
step, log, evaluate, checkpoint; then the last evaluation, checkpoint and ``final/``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..config import LoopConfig
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .fingerprint import check_same_run
from .metrics import MeanAccumulator, MetricsWriter, finite, read_metrics
from .schedule import BatchSchedule

log = logging.getLogger("preftune")
SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
Batch = dict[str, Any]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf; the run stopped before applying the update."""


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    history: list[dict] = field(default_factory=list)
    tokens_per_second: float = 0.0
    interrupted: bool = False


class Task(Protocol):
    """What the loop trains. ``module`` holds every trainable parameter; after ``accelerator.prepare`` the
    loop hands the prepared module back through ``attach`` and passes it to every call."""

    module: torch.nn.Module
    num_examples: int  # examples the schedule draws batches from (pairs, ranked lists, ...)
    progress_metric: tuple[str, str]  # (metric, its short label) shown beside the loss on the progress bar

    def param_groups(self, config: LoopConfig) -> list[dict]: ...
    def attach(self, module: torch.nn.Module, accelerator: Accelerator, progress) -> None: ...
    def micro_batch(self, positions: list[int]) -> Batch: ...
    def loss(self, module, batch: Batch, step: int, micro: int, weight: float,
             stats: MeanAccumulator) -> tuple[torch.Tensor, int]:
        """The micro-batch's share of the step's loss (0-d, with gradient): the sum of its examples' losses
        times ``weight`` (1 / examples in the step, times the process count); and the tokens processed."""
    def evaluate(self, module) -> dict[str, float] | None: ...
    # optional: ``samples(module) -> list[dict] | None``, generations written beside each evaluation
    def after_step(self, module, done: int, stats: MeanAccumulator) -> None: ...
    def checkpoint_state(self) -> tuple[dict, dict[str, torch.Tensor]]: ...
    def fingerprint(self) -> dict:
        """``{"settings": dotted config without output-only keys, "data": ..., "model": ...}`` (see fingerprint.py)."""
    def restore_state(self, state: dict, tensors: dict[str, torch.Tensor]) -> None: ...
    def export(self, module, history: list[dict]) -> Path: ...


class StopRequest:
    """First Ctrl-C (or SIGTERM) asks the loop to checkpoint and stop after the current step; a second aborts."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: signals cannot be caught here
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: finishing this step and writing a checkpoint (press again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Everything the ``preftune`` logger says during the run also goes to ``<run_dir>/train.log``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


class Loop:
    """One run of ``task`` under the ``training`` settings ``config``, writing into ``run_dir``."""

    def __init__(self, config: LoopConfig, task: Task, accelerator: Accelerator, run_dir: Path):
        self.config, self.task, self.accelerator, self.run_dir = config, task, accelerator, run_dir
        world = accelerator.num_processes
        self.schedule = BatchSchedule(task.num_examples, config.batch_size * world, config.gradient_accumulation_steps,
                                      config.seed, accelerator.process_index, world)
        self.total_steps = self.schedule.total_steps(config.epochs, config.max_steps)
        optimizer = torch.optim.AdamW(task.param_groups(config), lr=config.learning_rate,
                                      weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2),
                                      eps=config.adam_epsilon)
        warmup = config.warmup_steps or math.ceil(config.warmup_ratio * self.total_steps)
        scheduler = get_scheduler(SCHEDULERS[config.lr_scheduler], optimizer, num_warmup_steps=warmup,
                                  num_training_steps=self.total_steps)
        self.module, self.optimizer, self.scheduler = accelerator.prepare(task.module, optimizer, scheduler)
        task.attach(self.module, accelerator, self.progress)

    def progress(self, iterable, total, desc):
        disable = not self.config.progress_bar or not self.accelerator.is_main_process
        return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)

    def _resume_point(self) -> Path | None:
        mode = self.config.resume
        if mode == "never":
            if list_checkpoints(self.run_dir):
                log.warning("training.resume=never: ignoring the checkpoints in %s (they will be replaced)",
                            self.run_dir)
            return None
        if mode == "auto":
            return latest_checkpoint(self.run_dir)
        path = Path(mode)
        if not path.is_dir():
            raise FileNotFoundError(f"training.resume: checkpoint folder {path} does not exist")
        return path

    def _save(self, step: int) -> Path:
        extra, tensors = self.task.checkpoint_state()
        state = {"epoch": self.schedule.epoch_of(step), "total_steps": self.total_steps, **extra,
                 "fingerprint": self.fingerprint, "logging_window": self.stats.state()}
        if self.accelerator.scaler is not None:  # fp16: the loss scale is part of exact resume
            state["grad_scaler"] = self.accelerator.scaler.state_dict()
        path = save_checkpoint(self.run_dir, step, self.accelerator.unwrap_model(self.module), self.optimizer,
                               self.scheduler, state, self.config.save_total_limit, tensors=tensors)
        log.info("checkpoint written: %s", path)
        return path

    def _resume(self, checkpoint: Path) -> int:
        """Restore weights, optimizer, scheduler, RNG and the task's own state; returns the step."""
        restored = load_checkpoint(checkpoint, self.accelerator.unwrap_model(self.module), self.optimizer,
                                   self.scheduler)
        for change in check_same_run(restored.get("fingerprint"), self.fingerprint, checkpoint):
            log.warning("resuming with another run length (%s): the learning-rate schedule follows the new one",
                        change)
        self.task.restore_state(restored, restored["tensors"])
        self.stats = MeanAccumulator.from_state(restored.get("logging_window"))
        if self.accelerator.scaler is not None and "grad_scaler" in restored:
            self.accelerator.scaler.load_state_dict(restored["grad_scaler"])
        log.info("resumed from %s at step %d of %d", checkpoint, restored["step"], self.total_steps)
        return restored["step"]

    def _evaluate(self, writer: MetricsWriter, step: int) -> dict[str, float] | None:
        """Held-out metrics, and the task's sample generations when it makes some, written at ``step``."""
        scores = self.task.evaluate(self.module)
        if scores:
            writer.write({"step": step, **scores})
        samples = getattr(self.task, "samples", None)  # optional: a task that generates text
        rows = samples(self.module) if samples is not None else None
        if rows:
            writer.write_samples(step, rows)
        return scores

    def fit(self) -> TrainResult:
        t = self.config
        self.fingerprint, self.stats = self.task.fingerprint(), MeanAccumulator()
        resume_from = self._resume_point()
        start = self._resume(resume_from) if resume_from is not None else 0
        writer = MetricsWriter(self.run_dir, start if resume_from else None, self.accelerator, t)
        eval_before = None
        if start == 0 and t.eval_before_training:
            eval_before = self._evaluate(writer, 0)
        self.module.train()
        interrupted, tokens, seconds, done = False, 0, 0.0, start
        bar = self.progress(range(start, self.total_steps), self.total_steps - start, "training")
        with StopRequest() as stop:
            for step in bar:
                began = time.perf_counter()
                stats = self.stats
                step_tokens = self._optimizer_step(step, stats)
                elapsed = time.perf_counter() - began
                tokens, seconds = tokens + step_tokens, seconds + elapsed
                stats.add("tokens_per_second", step_tokens, elapsed)
                done = step + 1
                self.task.after_step(self.module, done, stats)
                if done % t.logging_steps == 0 or done == self.total_steps:
                    row = {"step": done, "epoch": round(self.schedule.epoch_of(done), 4), **stats.means(),
                           "lr": self.scheduler.get_last_lr()[0]}
                    writer.write(row)
                    if hasattr(bar, "set_postfix"):
                        key, label = self.task.progress_metric
                        bar.set_postfix({"loss": f"{row['loss']:.4f}", label: f"{row.get(key, float('nan')):.3g}"})
                    self.stats = MeanAccumulator()
                if t.eval_steps and done % t.eval_steps == 0 and done != self.total_steps:
                    self._evaluate(writer, done)
                if (t.save_steps and done % t.save_steps == 0) or (stop.requested and done < self.total_steps):
                    self._save(done)
                if stop.requested and done < self.total_steps:
                    interrupted = True
                    break
        result = self._finish(writer, done, interrupted, eval_before)
        result.tokens_per_second = tokens / seconds if seconds else 0.0
        return result

    def _finish(self, writer: MetricsWriter, final_step: int, interrupted: bool, eval_before) -> TrainResult:
        """Held-out evaluation, a last checkpoint and ``final/`` — unless the run was interrupted."""
        eval_after = final_dir = None
        if not interrupted:
            eval_after = self._evaluate(writer, final_step)
            latest = latest_checkpoint(self.run_dir)
            if latest is None or latest.name != f"step-{final_step:08d}":
                self._save(final_step)
        writer.close()
        history = read_metrics(self.run_dir)
        if not interrupted:
            final_dir = self.task.export(self.accelerator.unwrap_model(self.module), history)
        return TrainResult(self.run_dir, final_dir, final_step, eval_before, eval_after, history,
                           interrupted=interrupted)

    def _optimizer_step(self, step: int, stats: MeanAccumulator) -> int:
        """Run the micro-batches of one optimizer step and apply it; returns the tokens processed."""
        micro = self.schedule.step(step)
        # Each example weighs 1/N of the step's N examples whatever the micro-batch split: 1x8 == 8x1.
        weight = self.accelerator.num_processes / sum(len(m) for m in micro)
        tokens = 0
        for i, positions in enumerate(micro):
            batch = self.task.micro_batch(self.schedule.shard(positions))
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.module):
                loss, batch_tokens = self.task.loss(self.module, batch, step, i, weight, stats)
                if not finite(loss):
                    raise NonFiniteLossError(self._nonfinite_message(step, "loss", float(loss.detach())))
                self.accelerator.backward(loss)
            tokens += batch_tokens
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.module.parameters(), max_norm)
        if not finite(grad_norm) and not self._scaler_skips(step):
            raise NonFiniteLossError(self._nonfinite_message(step, "gradient norm", float(grad_norm)))
        if finite(grad_norm):
            stats.add_mean("grad_norm", float(grad_norm), 1)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return tokens

    def _scaler_skips(self, step: int) -> bool:
        """fp16: scaled gradients overflowed. The gradient scaler skips this update and halves its scale (as
        in every AMP loop); only gradients that overflow unscaled (scale <= 1) are a real failure."""
        scaler = self.accelerator.scaler
        if scaler is None or scaler.get_scale() <= 1.0:
            return False
        log.warning("step %d: fp16 gradients overflowed at loss scale %g; this update is skipped and the scale "
                    "lowered", step + 1, scaler.get_scale())
        return True

    def _nonfinite_message(self, step: int, what: str, value: float) -> str:
        last = latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        return (f"step {step + 1}: the {what} is {value}; stopping before applying this update ({kept}). "
                "Common causes: a learning rate too high, fp16/bf16 overflow, or a reference far from the policy.")
