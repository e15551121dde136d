"""The one training loop. Whatever it trains (a policy under a preference objective, a reward model) is a
``Task``; the loop owns what every run needs the same way: the optimizer and schedule, gradient accumulation
weighted per example, clipping, the NaN guard, logging, periodic evaluation, atomic checkpoints with exact
resume, Ctrl-C, and the final export.

Read ``Loop.fit`` top to bottom: resume, evaluate, then for each optimizer step run its micro-batches, clip,
step, log, evaluate, checkpoint; then the last evaluation, checkpoint and ``final/``.

Launched on several processes (``accelerate launch``, ``torchrun``), every process runs this same loop on its
rows of each global micro-batch (``schedule.Shard``); what is logged is reduced over all of them, and files
are written by the main process alone (``distributed``, ``checkpoint``, ``MetricsWriter``). Decisions that
one process could take alone (stop on Ctrl-C, stop on a non-finite loss, which checkpoint to resume) are
shared first, so that no process waits in a collective the others never reach.
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
from .distributed import (
    Ranks,
    any_process,
    full_tensor,
    is_fsdp2,
    is_main_process,
    main_decides,
    reduce_across,
    refuse_unsupported_engines,
    start_fsdp,
    whole_state_dict,
)
from .engines import (
    configure_deepspeed,
    is_deepspeed,
    loading_whole,
    zero_record,
    zero_stage,
)
from .fingerprint import check_same_run
from .kernels import fused_adamw
from .metrics import MeanAccumulator, MetricsWriter, finite, read_metrics
from .schedule import BatchSchedule, Shard

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
    def micro_batch(self, positions: Shard) -> Batch:
        """This process's rows of a global micro-batch (``positions.group``); a stand-in batch when
        ``positions.stand_in`` (its loss is weighted 0 and its statistics dropped by the loop)."""
    def loss(self, module, batch: Batch, step: int, micro: int, weight: float,
             stats: MeanAccumulator) -> tuple[torch.Tensor, int]:
        """The micro-batch's share of the step's loss (0-d, with gradient): the sum of its examples' losses
        times ``weight`` (1 / examples in the step, times the process count); and the tokens processed."""
    def evaluate(self, module) -> dict[str, float] | None:
        """Held-out metrics over every example once: each process scores its share, sums are reduced
        across processes; every process returns the same numbers."""
    # optional: ``samples(module) -> list[dict] | None``, generations written beside each evaluation
    def after_step(self, module, done: int, stats: MeanAccumulator) -> None: ...
    def checkpoint_state(self) -> tuple[dict, dict[str, torch.Tensor]]: ...
    def fingerprint(self) -> dict:
        """``{"settings": dotted config without output-only keys, "data": ..., "model": ...}`` (fingerprint.py)."""
    def restore_state(self, state: dict, tensors: dict[str, torch.Tensor]) -> None: ...
    def export(self, module, history: list[dict], whole: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``final/``; called on the main process only. ``whole``: under FSDP2, ``module``'s state dict
        gathered into whole tensors (its own parameters are shards)."""
    # optional: ``supports_fsdp = True`` / ``supports_deepspeed = True`` when checkpoints, reference and export
    # handle FSDP2 shards / DeepSpeed ZeRO-1/2


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
    """Everything the ``preftune`` logger says during the run also goes to ``<run_dir>/train.log``. With
    several processes only the main one writes the file and logs below WARNING (the others would repeat it)."""
    if not is_main_process():
        previous = log.level
        log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            log.setLevel(previous)
        return
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
        self.ranks = Ranks.of(accelerator)
        refuse_unsupported_engines(accelerator, fsdp_ok=getattr(task, "supports_fsdp", False),
                                   deepspeed_ok=getattr(task, "supports_deepspeed", False))
        self.sharded, self.deepspeed = is_fsdp2(accelerator), is_deepspeed(accelerator)
        if self.deepspeed:
            configure_deepspeed(accelerator, config.batch_size, config.max_grad_norm)
        world = accelerator.num_processes
        self.schedule = BatchSchedule(task.num_examples, config.batch_size * world, config.gradient_accumulation_steps,
                                      config.seed, accelerator.process_index, world)
        self.total_steps = self.schedule.total_steps(config.epochs, config.max_steps)
        groups = task.param_groups(config)
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay,
                                      betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                      fused=fused_adamw(groups, sharded=self.sharded or self.deepspeed) or None)
        warmup = config.warmup_steps or math.ceil(config.warmup_ratio * self.total_steps)
        scheduler = get_scheduler(SCHEDULERS[config.lr_scheduler], optimizer, num_warmup_steps=warmup,
                                  num_training_steps=self.total_steps)
        self.module, self.optimizer, self.scheduler = accelerator.prepare(task.module, optimizer, scheduler)
        if self.sharded:
            start_fsdp(self.module)
            local = sum(p.to_local().numel() for p in self.module.parameters())
            log.info("sharded with FSDP2 over %d processes: process 0 holds %d of %d weights", world, local,
                     sum(p.numel() for p in self.module.parameters()))
        elif self.deepspeed and zero_stage(accelerator) == 3:
            local = sum(p.ds_tensor.numel() for p in self.module.parameters())
            log.info("DeepSpeed ZeRO-3 over %d processes: weights, gradients and optimizer state split; process 0 "
                     "holds %d of %d weights", world, local, sum(p.ds_numel for p in self.module.parameters()))
        elif self.deepspeed:
            log.info("DeepSpeed ZeRO-%d over %d processes: each holds the model and 1/%d of the fp32 masters, "
                     "gradients and optimizer state", zero_stage(accelerator), world, world)
        task.attach(self.module, accelerator, self.progress)

    def progress(self, iterable, total, desc):
        disable = not self.config.progress_bar or not self.accelerator.is_main_process
        return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume from, as the main process sees the run directory."""
        return main_decides(self.accelerator, self._find_resume_point() if self.ranks.main else None)

    def _find_resume_point(self) -> Path | None:
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
        # the logging window since the last row, summed over processes (the main process restores it)
        window = reduce_across(self.stats, self.accelerator).state()
        state = {"epoch": self.schedule.epoch_of(step), "total_steps": self.total_steps, **extra,
                 "fingerprint": self.fingerprint, "logging_window": window}
        if self.deepspeed:  # its optimizer partitions resume only on the same launch
            state["deepspeed"] = zero_record(self.accelerator)
        if self.accelerator.scaler is not None:  # fp16: the loss scale is part of exact resume
            state["grad_scaler"] = self.accelerator.scaler.state_dict()
        path = save_checkpoint(self.run_dir, step, self.accelerator.unwrap_model(self.module), self.optimizer,
                               self.scheduler, state, self.config.save_total_limit, tensors=tensors,
                               ranks=self.ranks)
        log.info("checkpoint written: %s", path)
        return path

    def _resume(self, checkpoint: Path) -> int:
        """Restore weights, optimizer, scheduler, RNG and the task's own state; returns the step."""
        restored = load_checkpoint(checkpoint, self.accelerator.unwrap_model(self.module), self.optimizer,
                                   self.scheduler, rank=self.ranks.rank, deepspeed=zero_record(self.accelerator))
        for change in check_same_run(restored.get("fingerprint"), self.fingerprint, checkpoint):
            log.warning("resuming with another run length (%s): the learning-rate schedule follows the new one",
                        change)
        self.task.restore_state(restored, restored["tensors"])
        if self.ranks.main:  # the window was saved summed over processes: counted once
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
                # summed over processes: the global batch's tokens over the (mean) time of one step
                stats.add("tokens_per_second", step_tokens, elapsed / self.ranks.world)
                done = step + 1
                self.task.after_step(self.module, done, stats)
                stop_requested = any_process(self.accelerator, stop.requested)[0]  # every process stops together
                if done % t.logging_steps == 0 or done == self.total_steps:
                    means = reduce_across(stats, self.accelerator).means()
                    row = {"step": done, "epoch": round(self.schedule.epoch_of(done), 4), **means,
                           "lr": self.scheduler.get_last_lr()[0]}
                    writer.write(row)
                    if hasattr(bar, "set_postfix"):
                        key, label = self.task.progress_metric
                        bar.set_postfix({"loss": f"{row['loss']:.4f}", label: f"{row.get(key, float('nan')):.3g}"})
                    self.stats = MeanAccumulator()
                if t.eval_steps and done % t.eval_steps == 0 and done != self.total_steps:
                    self._evaluate(writer, done)
                # the last step's checkpoint comes after the final evaluation (_finish)
                if done < self.total_steps and ((t.save_steps and done % t.save_steps == 0) or stop_requested):
                    self._save(done)
                if stop_requested and done < self.total_steps:
                    interrupted = True
                    break
        result = self._finish(writer, done, interrupted, eval_before, resumed_at_end=start == self.total_steps > 0)
        result.tokens_per_second = tokens / seconds if seconds else 0.0
        return result

    def _finish(self, writer: MetricsWriter, final_step: int, interrupted: bool, eval_before,
                 resumed_at_end: bool) -> TrainResult:
        """Held-out evaluation, then the last checkpoint (so a checkpoint at the last step means its evaluation
        row is written: a run killed during the export resumes to the export alone), and ``final/``; nothing
        but the metrics file if the run was interrupted."""
        eval_after = final_dir = None
        if not interrupted and resumed_at_end:
            rows = [r for r in read_metrics(self.run_dir) if r["step"] == final_step and any("/" in k for k in r)
                    and "loss" not in r]
            eval_after = {k: v for k, v in rows[-1].items() if k != "step"} if rows else None
        elif not interrupted:
            eval_after = self._evaluate(writer, final_step)
            self._save(final_step)
        writer.close()
        self.ranks.barrier()  # metrics.jsonl is complete before anyone reads it
        history = read_metrics(self.run_dir)
        if not interrupted:
            final_dir = Path(self.config.output_dir) / "final"
            # FSDP2: every process gathers the whole weights (a collective), the main one writes them
            whole = None
            if self.sharded:
                whole = whole_state_dict(self.module)
            elif self.deepspeed:  # the fp32 masters, not DeepSpeed's working copy
                whole = whole_state_dict(self.accelerator.unwrap_model(self.module), masters=True)
            if self.ranks.main:  # alone: whatever it loads (a base to merge into) is loaded whole
                with loading_whole() if self.deepspeed else contextlib.nullcontext():
                    final_dir = self.task.export(self.accelerator.unwrap_model(self.module), history, whole)
            self.ranks.barrier()  # final/ is in place when any process returns
        return TrainResult(self.run_dir, final_dir, final_step, eval_before, eval_after, history,
                           interrupted=interrupted)

    def _optimizer_step(self, step: int, stats: MeanAccumulator) -> int:
        """Run this process's share of the micro-batches of one optimizer step and apply it; returns the
        tokens it processed."""
        micro = self.schedule.step(step)
        # Each example weighs 1/N of the step's N examples whatever the micro-batch split: 1x8 == 8x1. DDP
        # averages gradients over the P processes, hence the factor P: P processes x b == 1 process x P*b.
        weight = self.ranks.world / sum(len(m) for m in micro)
        tokens, bad_loss = 0, None
        for i, group in enumerate(micro):
            shard = self.schedule.shard(group)
            batch = self.task.micro_batch(shard)
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.module):
                counted = MeanAccumulator() if shard.stand_in else stats  # a stand-in's numbers are not counted
                loss, batch_tokens = self.task.loss(self.module, batch, step, i, 0.0 if shard.stand_in else weight,
                                                    counted)
                if not finite(loss):
                    bad_loss = float(loss.detach())
                    if self.ranks.world == 1:
                        raise NonFiniteLossError(self._nonfinite_message(step, "loss", bad_loss))
                # decided before the last backward: under DeepSpeed the optimizer step runs inside it
                if last and any_process(self.accelerator, bad_loss is not None)[0]:
                    shown = bad_loss if bad_loss is not None else float("nan")
                    raise NonFiniteLossError(self._nonfinite_message(step, "loss (on at least one process)", shown))
                if self.deepspeed:  # DeepSpeed reduces and steps at the boundary: the step's last micro-batch
                    self.accelerator.gradient_state._set_sync_gradients(last)
                self.accelerator.backward(loss)  # with several processes, all must reach the gradient all-reduce
            tokens += 0 if shard.stand_in else batch_tokens
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = full_tensor(self.accelerator.clip_grad_norm_(self.module.parameters(), max_norm))
        if grad_norm is None:  # DeepSpeed skipped its step (fp16 overflow) and reports no norm
            pass
        elif not finite(grad_norm) and not self._scaler_skips(step):
            raise NonFiniteLossError(self._nonfinite_message(step, "gradient norm", float(grad_norm),
                                                             applied=self.deepspeed))
        elif finite(grad_norm):
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

    def _nonfinite_message(self, step: int, what: str, value: float, applied: bool = False) -> str:
        last = latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        when = ("stopping; DeepSpeed applied this update inside backward, so the model in memory is damaged"
                if applied else "stopping before applying this update")
        return (f"step {step + 1}: the {what} is {value}; {when} ({kept}). "
                "Common causes: a learning rate too high, fp16/bf16 overflow, or a reference far from the policy.")
