"""The one training loop. It reads objectives' traits, never their names.

Read top to bottom: set up (data first, then models), optionally precompute the reference, evaluate,
then for each optimizer step run its micro-batches, clip, step, log, evaluate, checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import modeling
from ..config import Config, save_config
from ..data import Collator
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .export import export_final
from .logps import CompletionLogps
from .metrics import MeanAccumulator, MetricsWriter, add_batch_statistics, finite, read_metrics
from .pipeline import batches, build_reference, precompute_reference, read_data, tokenize
from .schedule import BatchSchedule, sequential_batches
from .step import Scorer, evaluate
from .sync import syncing_reference

log = logging.getLogger("preftune")
SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


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


class _StopRequest:
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


def make_accelerator(precision: str) -> Accelerator:
    """A fresh Accelerator for this run. accelerate keeps process-wide state that refuses a second run with
    another precision (a notebook training fp32 then bf16): reset that part, never the distributed one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", step_scheduler_with_optimizer=False)


def _value_head(policy: torch.nn.Module) -> torch.nn.Module:
    """A scalar value head V(x) on the policy's last prompt hidden state (DRO), zero-initialised so that
    training starts from V = 0."""
    config = policy.get_base_model().config if hasattr(policy, "get_base_model") else policy.config
    hidden = config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head.to(next(policy.parameters()).device)


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _resume_point(config: Config, run_dir: Path) -> Path | None:
    mode = config.training.resume
    if mode == "never":
        if list_checkpoints(run_dir):
            log.warning("training.resume=never: ignoring the checkpoints in %s (they will be replaced)", run_dir)
        return None
    if mode == "auto":
        return latest_checkpoint(run_dir)
    path = Path(mode)
    if not path.is_dir():
        raise FileNotFoundError(f"training.resume: checkpoint folder {path} does not exist")
    return path


def train(config: Config, command: str = "train") -> TrainResult:
    t = config.training
    objective = config.objective.plan()
    run_dir = Path(t.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _setup_logging(run_dir)
    try:
        log.info("preftune %s: objective %s, run directory %s", command, objective.name, run_dir)
        if isinstance(t.stages, list):  # one file per sDPO stage: validate them all before any model loads
            for path in t.stages:
                read_data(dataclasses.replace(config, data=dataclasses.replace(config.data, train_file=path)),
                          objective, None)
            splits = None
        else:
            splits = read_data(config, objective, run_dir)  # bad data fails here, before any model loads
        if t.stages:
            from .stages import train_in_stages

            return train_in_stages(config, command, splits, train)
        save_config(config, run_dir / "config.yaml")
        torch.manual_seed(t.seed)
        accelerator = make_accelerator(t.precision)
        tokenizer = modeling.load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
        data = tokenize(config, splits, tokenizer)
        policy = modeling.load_policy(config).to(accelerator.device)
        trainable, total = modeling.count_parameters(policy)
        log.info("policy: %s, %d of %d parameters trainable", config.model.name_or_path, trainable, total)
        run = _Run(config, accelerator, objective, tokenizer, policy, data, run_dir, splits.shape)
        return run.fit()
    finally:
        log.removeHandler(handler)
        handler.close()


class _Run:
    """State of one training run; ``fit`` is the loop."""

    def __init__(self, config, accelerator, objective, tokenizer, policy, data, run_dir, shape):
        t = config.training
        self.config, self.accelerator, self.objective = config, accelerator, objective
        self.tokenizer, self.data, self.run_dir, self.shape = tokenizer, data, run_dir, shape
        self.collator = Collator(tokenizer.pad_token_id, shape)
        self.policy = policy
        self.schedule = BatchSchedule(len(data.train), t.batch_size * accelerator.num_processes,
                                      t.gradient_accumulation_steps, t.seed, accelerator.process_index,
                                      accelerator.num_processes)
        self.total_steps = self.schedule.total_steps(t.epochs, t.max_steps)
        if objective.batch_level and t.gradient_accumulation_steps > 1:
            log.warning("objective %r compares examples within a micro-batch: with gradient accumulation its "
                        "loss is that of %d batches of %d, not of one batch of %d", objective.name,
                        t.gradient_accumulation_steps, t.batch_size, t.batch_size * t.gradient_accumulation_steps)
        value_head = _value_head(policy) if objective.needs_value else None
        wrapped = CompletionLogps(policy, t.logps_chunk_size, value_head)
        optimizer = torch.optim.AdamW(
            [p for p in wrapped.parameters() if p.requires_grad], lr=t.learning_rate, weight_decay=t.weight_decay,
            betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
        )
        warmup = t.warmup_steps or math.ceil(t.warmup_ratio * self.total_steps)
        scheduler = get_scheduler(SCHEDULERS[t.lr_scheduler], optimizer, num_warmup_steps=warmup,
                                  num_training_steps=self.total_steps)
        self.wrapped, self.optimizer, self.scheduler = accelerator.prepare(wrapped, optimizer, scheduler)
        reference = build_reference(config, objective, policy, accelerator.autocast)
        self.syncs = 0
        if config.reference.sync_steps:
            if reference is None:
                raise ValueError(f"reference.sync_steps (TR-DPO) needs an objective with a reference; "
                                 f"{objective.name!r} is reference-free")
            reference = syncing_reference(reference, config.lora.enabled)
        self.train_reference = self.eval_reference = reference
        if reference is not None and config.reference.precompute:
            self._precompute(reference)
        token_reference = reference.token_level() if objective.needs_live_reference else None
        self.scorer = Scorer(self.wrapped, self.train_reference, objective, token_reference)
        self.eval_scorer = Scorer(self.wrapped, self.eval_reference, objective, token_reference)
        self.state: dict[str, torch.Tensor] = {}  # the objective's running statistics (β-DPO, BCO)
        self.retain = None
        if config.data.retain_file:
            from .retain import RetainSet

            self.retain = RetainSet(config, tokenizer, accelerator.device, accelerator.process_index,
                                    accelerator.num_processes)

    def _progress(self, iterable, total, desc):
        disable = not self.config.training.progress_bar or not self.accelerator.is_main_process
        return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)

    def _precompute(self, reference) -> None:
        device = self.accelerator.device
        self.train_reference = precompute_reference(
            self.config, reference, self.data.train, self.collator, device, "train", self._progress)
        if self.data.eval:
            self.eval_reference = precompute_reference(
                self.config, reference, self.data.eval, self.collator, device, "eval", self._progress)
        if not self.config.lora.enabled:
            reference.release()  # free the frozen copy: from now on the cache answers
        log.info("reference log-probs precomputed; the reference model is no longer needed")

    def _evaluate(self) -> dict[str, float] | None:
        if not self.data.eval:
            return None
        order = sequential_batches(len(self.data.eval), self.config.training.eval_batch_size)
        loader = batches(self.data.eval, order, self.collator, self.accelerator.device)
        return evaluate(self.eval_scorer, self._progress(loader, len(order), "evaluating"), self.wrapped, self.state)

    def _save(self, step: int) -> Path:
        state = {"epoch": self.schedule.epoch_of(step), "total_steps": self.total_steps}
        tensors = dict(self.state)
        if self.config.reference.sync_steps:  # the reference moved: resuming needs it as it is now
            tensors.update({f"reference/{k}": v for k, v in self.train_reference.state().items()})
            state["reference_syncs"] = self.syncs
        path = save_checkpoint(self.run_dir, step, self.accelerator.unwrap_model(self.wrapped), self.optimizer,
                               self.scheduler, state, self.config.training.save_total_limit, tensors=tensors)
        log.info("checkpoint written: %s", path)
        return path

    def _resume(self, checkpoint: Path) -> int:
        """Restore weights, optimizer, scheduler, RNG, objective state and a moving reference; returns the step."""
        restored = load_checkpoint(checkpoint, self.accelerator.unwrap_model(self.wrapped), self.optimizer,
                                   self.scheduler)
        tensors = restored["tensors"]
        self.state = {k: v for k, v in tensors.items() if not k.startswith("reference/")}
        if self.config.reference.sync_steps:
            prefix = len("reference/")
            self.train_reference.load_state({k[prefix:]: v for k, v in tensors.items() if k.startswith("reference/")})
            self.syncs = restored.get("reference_syncs", 0)
        log.info("resumed from %s at step %d of %d", checkpoint, restored["step"], self.total_steps)
        return restored["step"]

    def fit(self) -> TrainResult:
        t = self.config.training
        resume_from = _resume_point(self.config, self.run_dir)
        start = self._resume(resume_from) if resume_from is not None else 0
        writer = MetricsWriter(self.run_dir, start if resume_from else None, t.tensorboard)
        eval_before = None
        if start == 0 and t.eval_before_training:
            eval_before = self._evaluate()
            if eval_before:
                writer.write({"step": 0, **eval_before})
        self.wrapped.train()
        stats, interrupted, tokens, seconds = MeanAccumulator(), False, 0, 0.0
        bar = self._progress(range(start, self.total_steps), self.total_steps - start, "training")
        with _StopRequest() as stop:
            for step in bar:
                began = time.perf_counter()
                step_tokens = self._optimizer_step(step, stats)
                elapsed = time.perf_counter() - began
                tokens, seconds = tokens + step_tokens, seconds + elapsed
                stats.add("tokens_per_second", step_tokens, elapsed)
                done = step + 1
                self._maybe_sync_reference(done, stats)
                if done % t.logging_steps == 0 or done == self.total_steps:
                    row = {"step": done, "epoch": round(self.schedule.epoch_of(done), 4), **stats.means(),
                           "lr": self.scheduler.get_last_lr()[0]}
                    writer.write(row)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', 0):.2f}")
                    stats = MeanAccumulator()
                if t.eval_steps and done % t.eval_steps == 0 and done != self.total_steps:
                    scores = self._evaluate()
                    if scores:
                        writer.write({"step": done, **scores})
                if (t.save_steps and done % t.save_steps == 0) or (stop.requested and done < self.total_steps):
                    self._save(done)
                if stop.requested and done < self.total_steps:
                    interrupted = True
                    break
        final_step = done if self.total_steps > start else start
        result = self._finish(writer, final_step, interrupted, eval_before)
        result.tokens_per_second = tokens / seconds if seconds else 0.0
        return result

    def _finish(self, writer: MetricsWriter, final_step: int, interrupted: bool, eval_before) -> TrainResult:
        """Held-out evaluation, a last checkpoint and ``final/`` — unless the run was interrupted."""
        eval_after = final_dir = None
        if not interrupted:
            eval_after = self._evaluate()
            if eval_after:
                writer.write({"step": final_step, **eval_after})
            latest = latest_checkpoint(self.run_dir)
            if latest is None or latest.name != f"step-{final_step:08d}":
                self._save(final_step)
        writer.close()
        history = read_metrics(self.run_dir)
        if not interrupted:
            unwrapped = self.accelerator.unwrap_model(self.wrapped)
            final_dir = export_final(self.config, unwrapped.model, self.tokenizer, self.run_dir, history, self.data,
                                     self.objective.primary.objective, value_head=unwrapped.value_head)
        return TrainResult(self.run_dir, final_dir, final_step, eval_before, eval_after, history,
                           interrupted=interrupted)

    def _optimizer_step(self, step: int, stats: MeanAccumulator) -> int:
        """Run the micro-batches of one optimizer step and apply it; returns the tokens processed."""
        micro = self.schedule.step(step)
        # Each example weighs 1/N of the step's N examples whatever the micro-batch split: 1x8 == 8x1.
        weight = self.accelerator.num_processes / sum(len(m) for m in micro)
        tokens = 0
        for i, positions in enumerate(micro):
            batch = next(batches(self.data.train, [self.schedule.shard(positions)], self.collator,
                                 self.accelerator.device))
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped)
            with sync:
                out, logps = self.scorer(batch, self.state)
                loss = out.losses.sum() * weight
                if self.retain is not None:
                    loss = loss + self.retain.loss(self.wrapped, step, i, stats)
                if not finite(loss):
                    raise NonFiniteLossError(self._nonfinite_message(step, "loss", float(loss.detach())))
                self.accelerator.backward(loss)
            add_batch_statistics(stats, out, logps)
            self.state = {**self.state, **out.state}
            tokens += int(batch["attention_mask"].sum())
        max_norm = self.config.training.max_grad_norm or float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.wrapped.parameters(), max_norm)
        if not finite(grad_norm):
            raise NonFiniteLossError(self._nonfinite_message(step, "gradient norm", float(grad_norm)))
        stats.add_mean("grad_norm", float(grad_norm), 1)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return tokens

    def _maybe_sync_reference(self, done: int, stats: MeanAccumulator) -> None:
        """TR-DPO: after every ``sync_steps`` optimizer steps, move the reference towards the policy."""
        every, alpha = self.config.reference.sync_steps, self.config.reference.sync_alpha
        if not every or done % every:
            return
        self.train_reference.sync(self.accelerator.unwrap_model(self.wrapped).model, alpha)
        self.syncs += 1
        log.info("reference synced with the policy after step %d (alpha=%g, sync %d)", done, alpha, self.syncs)
        stats.add_mean("reference/syncs", float(self.syncs), 1)

    def _nonfinite_message(self, step: int, what: str, value: float) -> str:
        last = latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        return (f"step {step + 1}: the {what} is {value}; stopping before applying this update ({kept}). "
                "Common causes: a learning rate too high, fp16/bf16 overflow, or a reference far from the policy.")
