"""Preference optimization (and SFT) as a task of the training loop: the policy's completion log-probs, the
reference the objective needs, the objective's running statistics, a retain set, TR-DPO's moving reference,
held-out evaluation and the ``final/`` export.

``train_run`` is one run from a checked config: data first (bad rows fail before any model loads), then the
tokenizer, the policy and the loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import modeling
from ..config import Config, save_config, to_dict
from ..data import Collator, TokenizedSplits, content_hash, read_splits, tokenize_splits
from .distributed import RowGather, collate_shard, is_fsdp2, is_main_process, reduce_across, shard_frozen
from .engines import prepare_frozen, zero3_launch
from .export import export_final
from .fingerprint import model_identity, settings
from .logps import CompletionLogps
from .loop import Loop, TrainResult, run_log
from .metrics import MeanAccumulator, add_batch_statistics, tracker_names
from .precision import compute_kernels, prepare_for_bf16, restore_frozen_linears
from .reference import build_reference, precompute_reference
from .samples import generate_samples, sample_prompts
from .schedule import Shard, sequential_batches, shards
from .step import Scorer, evaluation_sums, is_stand_in
from .sync import syncing_reference

log = logging.getLogger("preftune")


def _value_head(policy: torch.nn.Module) -> torch.nn.Module:
    """A scalar value head V(x) on the policy's last prompt hidden state (DRO), zero-initialised so that
    training starts from V = 0."""
    config = policy.get_base_model().config if hasattr(policy, "get_base_model") else policy.config
    head = torch.nn.Linear(config.get_text_config().hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head.to(next(policy.parameters()).device)


class PreferenceTask:
    """The policy (wrapped so one forward returns completion log-probs) under ``objective`` (an ObjectivePlan).

    Under FSDP2 the policy and a separate frozen reference are both sharded by accelerate; every forward is
    then a collective, which the loop's stand-in batches keep in step (evaluation, precompute, samples)."""

    supports_fsdp = supports_deepspeed = True

    def __init__(self, config: Config, objective, tokenizer, policy: torch.nn.Module, data: TokenizedSplits,
                 shape: str):
        t = config.training
        self.config, self.objective, self.tokenizer, self.policy, self.data = config, objective, tokenizer, policy, data
        self.collator = Collator(tokenizer.pad_token_id, shape)
        self.num_examples = len(data.train)
        # what the progress bar shows beside the loss: SFT has no rejected completion to be accurate about
        self.progress_metric = ("rewards/accuracies", "acc") if objective.uses_rejected else ("logps/chosen", "logps")
        if objective.batch_level and t.gradient_accumulation_steps > 1:
            log.warning("objective %r compares examples within a (global) micro-batch: with gradient accumulation "
                        "its loss is that of %d batches of %d per device, not of one batch of %d per device",
                        objective.name, t.gradient_accumulation_steps, t.batch_size,
                        t.batch_size * t.gradient_accumulation_steps)
        value_head = _value_head(policy) if objective.needs_value else None
        self.module = CompletionLogps(policy, t.logps_chunk_size, value_head, t.packing)
        # built now, from the starting policy as loaded: accelerate's FSDP2 preparation shards it in place
        self.reference = build_reference(config, objective, policy, lambda: self.accelerator.autocast())
        self.state: dict[str, torch.Tensor] = {}  # the objective's running statistics (β-DPO, BCO)
        self.syncs = 0
        self.retain = None

    def param_groups(self, config) -> list[dict]:
        return [{"params": [p for p in self.module.parameters() if p.requires_grad]}]

    def attach(self, module, accelerator, progress) -> None:
        """Build the reference (from the unwrapped policy), precompute it if asked, and the scorers."""
        config, objective = self.config, self.objective
        self.accelerator, self.progress = accelerator, progress
        reference, self.reference = self.reference, None
        separate = getattr(reference, "model", None) is not None and reference.model is not self.policy
        if separate and is_fsdp2(accelerator):  # sharded like the policy, not held whole by every process
            reference.model = shard_frozen(accelerator, reference.model)
            log.info("reference model sharded with FSDP2 like the policy")
        elif separate and zero3_launch(accelerator):  # split like the policy; each use is one engine forward
            reference.runner = prepare_frozen(accelerator, CompletionLogps(reference.model, reference.chunk_size,
                                                                           packing=reference.packing))
            log.info("reference model split with DeepSpeed ZeRO-3 like the policy")
        elif config.training.precision == "bf16" and separate:
            prepare_for_bf16(reference.model)  # a frozen copy: autocast would round it at every use
        if config.reference.sync_steps:
            if reference is None:
                raise ValueError(f"reference.sync_steps (TR-DPO) needs an objective with a reference; "
                                 f"{objective.name!r} is reference-free")
            reference = syncing_reference(reference, config.lora.enabled)
        self.train_reference = self.eval_reference = reference
        if reference is not None and config.reference.precompute:
            self._precompute(reference)
        token_reference = reference.token_level() if objective.needs_live_reference else None
        # a batch-level objective sees the global micro-batch, gathered from every process
        gather = RowGather(accelerator) if objective.batch_level and accelerator.num_processes > 1 else None
        self.scorer = Scorer(module, self.train_reference, objective, token_reference, gather)
        self.eval_scorer = Scorer(module, self.eval_reference, objective, token_reference, gather)
        if config.data.retain_file:
            from .retain import RetainSet

            self.retain = RetainSet(config, self.tokenizer, accelerator.device, accelerator.process_index,
                                    accelerator.num_processes)

    def _precompute(self, reference) -> None:
        accelerator = self.accelerator
        self.train_reference = precompute_reference(
            self.config, reference, self.data.train, self.collator, "train", self.progress, accelerator)
        if self.data.eval:
            self.eval_reference = precompute_reference(
                self.config, reference, self.data.eval, self.collator, "eval", self.progress, accelerator)
        if not self.config.lora.enabled:
            reference.release()  # free the frozen copy: from now on the cache answers
        log.info("reference log-probs precomputed; the reference model is no longer needed")

    def micro_batch(self, positions: Shard):
        return collate_shard(self.data.train, positions, self.collator, self.accelerator.device)

    def loss(self, module, batch, step: int, micro: int, weight: float,
             stats: MeanAccumulator) -> tuple[torch.Tensor, int]:
        out, logps = self.scorer(batch, self.state)
        loss = out.losses.sum() * weight
        if self.retain is not None:  # weighted over the step's retain examples by the retain set itself
            loss = loss + self.retain.loss(module, step, micro, stats)
        if not is_stand_in(batch):
            add_batch_statistics(stats, out, logps)
        self.state = {**self.state, **out.state}
        return loss, int(batch["attention_mask"].sum())

    def evaluate(self, module) -> dict[str, float] | None:
        """Held-out metrics; every example once, in global batches of ``eval_batch_size`` per process."""
        if not self.data.eval:
            return None
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        parts = shards(sequential_batches(len(self.data.eval), self.config.training.eval_batch_size * world),
                       rank, world)
        loader = (collate_shard(self.data.eval, part, self.collator, self.accelerator.device) for part in parts)
        sums = evaluation_sums(self.eval_scorer, self.progress(loader, len(parts), "evaluating"), module, self.state)
        return {f"eval/{k}": v for k, v in reduce_across(sums, self.accelerator).means().items()}

    def samples(self, module) -> list[dict] | None:
        """Greedy generations for ``training.sample_prompts`` fixed prompts (``samples.py``), every process
        alike (no collective), written by the main one."""
        t = self.config.training
        if not t.sample_prompts:
            return None
        if not hasattr(self, "_sample_prompts"):
            self._sample_prompts = sample_prompts(self.data, t.sample_prompts)
        split, examples = self._sample_prompts
        policy = self.accelerator.unwrap_model(module).model
        return generate_samples(policy, self.tokenizer, split, examples, t.sample_max_new_tokens)

    def after_step(self, module, done: int, stats: MeanAccumulator) -> None:
        """TR-DPO: after every ``sync_steps`` optimizer steps, move the reference towards the policy."""
        every, alpha = self.config.reference.sync_steps, self.config.reference.sync_alpha
        if not every or done % every:
            return
        self.train_reference.sync(self.accelerator.unwrap_model(module).model, alpha)
        self.syncs += 1
        log.info("reference synced with the policy after step %d (alpha=%g, sync %d)", done, alpha, self.syncs)
        stats.add_mean("reference/syncs", float(self.syncs), 1)

    def checkpoint_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        extra, tensors = {}, dict(self.state)
        if self.config.reference.sync_steps:  # the reference moved: resuming needs it as it is now
            tensors.update({f"reference/{k}": v for k, v in self.train_reference.state().items()})
            extra["reference_syncs"] = self.syncs
        return extra, tensors

    def restore_state(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.state = {k: v for k, v in tensors.items() if not k.startswith("reference/")}
        if self.config.reference.sync_steps:
            prefix = len("reference/")
            self.train_reference.load_state({k[prefix:]: v for k, v in tensors.items() if k.startswith("reference/")})
            self.syncs = state.get("reference_syncs", 0)

    def fingerprint(self) -> dict:
        return {"settings": settings(to_dict(self.config)),
                "data": content_hash(self.data.train) + content_hash(self.data.eval),
                "model": model_identity(modeling.resolve(self.config.model.name_or_path))}

    def export(self, module, history: list[dict], whole: dict[str, torch.Tensor] | None = None) -> Path:
        restore_frozen_linears(module.model, modeling.DTYPES[self.config.model.dtype])  # merging must not round
        return export_final(self.config, module.model, self.tokenizer, Path(self.config.training.output_dir),
                            history, self.data, self.objective.primary.objective, value_head=module.value_head,
                            whole=whole)


def train_run(config: Config, objective, command: str = "train") -> TrainResult:
    """One run: validated data, then tokenizer, policy and the loop (``objective`` is the config's plan)."""
    run_dir = Path(config.training.output_dir)
    with run_log(run_dir):
        log.info("preftune %s: objective %s, run directory %s", command, objective.name, run_dir)
        main = is_main_process()
        # bad data fails here, before any model loads; the main process writes the skip report
        splits = read_splits(config, objective, run_dir if main else None)
        if main:
            save_config(config, run_dir / "config.yaml")
        torch.manual_seed(config.training.seed)
        accelerator = modeling.make_accelerator(config.training.precision, tracker_names(config.training), run_dir)
        adapter_reference = config.lora.enabled and not config.reference.name_or_path
        if is_fsdp2(accelerator) and adapter_reference and objective.needs_live_reference:
            raise ValueError(f"objective {objective.name!r} reads the reference token by token inside the policy's "
                             "forward; with LoRA that reference is the policy itself with adapters off, and under "
                             "FSDP2 (torch 2.13) that nested use of the same sharded units crashes in the backward. "
                             "Launch with configs/accelerate/ddp.yaml, or train without LoRA (the reference is then "
                             "a sharded copy), or give reference.name_or_path")
        if zero3_launch(accelerator) and objective.needs_live_reference:
            raise ValueError(f"objective {objective.name!r} reads the reference token by token inside the policy's "
                             "forward, which preftune does not run under DeepSpeed ZeRO-3; launch with "
                             "configs/accelerate/fsdp.yaml (weights sharded the same way) or deepspeed_zero2.yaml")
        if config.model.quantization and (is_fsdp2(accelerator) or zero3_launch(accelerator)):
            raise ValueError("model.quantization (QLoRA) under FSDP or ZeRO-3 is not supported: the quantized base "
                             "would need bitsandbytes' float quant_storage to be sharded; launch with "
                             "configs/accelerate/ddp.yaml (QLoRA keeps a 7B model on one device)")
        tokenizer = modeling.load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
        data = tokenize_splits(config, splits, tokenizer, run_dir if main else None)
        policy = modeling.place(modeling.load_policy(config), accelerator.device)
        # frozen weights stored as autocast would use them, one bf16 copy of each activation (precision.py);
        # not under FSDP2 or ZeRO-3, whose units gather one dtype
        if config.training.precision == "bf16" and not (is_fsdp2(accelerator) or zero3_launch(accelerator)):
            prepare_for_bf16(policy)
        trainable, total = modeling.count_parameters(policy)
        log.info("policy: %s%s, %d of %d parameters trainable", config.model.name_or_path,
                 f" ({config.model.quantization} quantized)" if config.model.quantization else "", trainable, total)
        # the task precomputes the reference (when asked): with the kernels its cache key names
        with compute_kernels(config.training.precision, accelerator.device):
            task = PreferenceTask(config, objective, tokenizer, policy, data, splits.shape)
            return Loop(config.training, task, accelerator, run_dir).fit()
