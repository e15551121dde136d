"""``preftune reward CONFIG``: train a Bradley–Terry reward model (a scalar head on any backbone) on the same
training loop as every other run, so it checkpoints and resumes exactly, stops cleanly on Ctrl-C, guards
against NaN, accumulates gradients per example and can train LoRA adapters on the backbone.

Pairs train with -log σ(r_c - r_r); ranked lists with Plackett–Luce, -Σ_k log softmax(r_k, ..., r_K) (see
``losses``); a batch may hold both. The run directory holds ``config.yaml``, ``metrics.jsonl`` (``step``,
``loss``, ``accuracy``, ``margin``, ``lr``, ``grad_norm``; evaluation rows ``eval/loss``, ``eval/accuracy``,
``eval/margin``), checkpoints, ``reward_summary.json`` and ``final/``: the model, which loads back as the
``reward_model`` judge. Accuracy is pairwise: the fraction of ranked pairs with r_better > r_worse
(strictly; tied scores in a list are not pairs). With ``model.freeze_backbone`` only the head trains and
every text is pooled once, so an epoch costs a few matrix products.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import Tensor

from .. import modeling
from ..atomic import write_json, write_text
from ..config import ConfigError, LoopConfig, LoraConfig, beside, load_section, validate_loop
from ..training.distributed import is_main_process, reduce_across
from ..training.fingerprint import model_identity, settings
from ..training.loop import Loop, run_log
from ..training.metrics import MeanAccumulator, tracker_names
from ..training.precision import compute_kernels, prepare_for_bf16, restore_frozen_linears
from ..training.schedule import sequential_batches, shards
from .data import (
    Group,
    RewardDataConfig,
    RewardTexts,
    build_groups,
    load_reward_examples,
    resolved_chat_template,
    stack_groups,
)
from .losses import pairwise_accuracy, plackett_luce_loss
from .model import (
    RewardBackboneConfig,
    RewardModel,
    encode,
    load_reward_tokenizer,
    pad_batch,
    resolve_backbone,
)

log = logging.getLogger("preftune")


@dataclass
class RewardTrainingConfig(LoopConfig):
    output_dir: str = "runs/reward"
    batch_size: int = 16  # pairs or ranked lists per device per micro-batch
    eval_batch_size: int = 64  # pairs or lists per evaluation batch; texts per batch when pooling a frozen backbone
    learning_rate: float = 1e-5  # the backbone's (or its LoRA adapters')
    head_learning_rate: float | None = None  # null: learning_rate (a frozen backbone trains the head alone)
    # Decoders read at the last token run packed: prefix_shared (the texts of a pair or list compute their
    # common beginning, the prompt, once), padding_free, or padded; the same rewards either way.
    packing: Literal["prefix_shared", "padding_free", "padded"] = "prefix_shared"


@dataclass
class RewardConfig:
    model: RewardBackboneConfig = field(default_factory=RewardBackboneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters on the backbone; final/ holds them merged
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    training: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)


@dataclass
class RewardResult:
    run_dir: Path
    final_dir: Path | None
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    interrupted: bool = False
    rewards: TextRewards | None = None  # the trained model as a function of texts (for reports on more data)


def check(config: RewardConfig) -> None:
    t = config.training
    if not config.model.name_or_path:
        raise ConfigError("config key 'model.name_or_path': no backbone to put the reward head on")
    if not config.data.train_file:
        raise ConfigError("config key 'data.train_file': no pairs or ranked lists to train on")
    validate_loop(t)
    if t.head_learning_rate is not None and t.head_learning_rate <= 0:
        raise ConfigError(f"config key 'training.head_learning_rate': must be > 0 or null, got {t.head_learning_rate}")
    if config.model.max_length < 2:
        raise ConfigError(f"config key 'model.max_length': must be >= 2, got {config.model.max_length}")
    if not 0 <= config.data.eval_fraction < 1:
        raise ConfigError(f"config key 'data.eval_fraction': must be in [0, 1), got {config.data.eval_fraction}")
    if config.data.eval_split and config.data.eval_fraction:
        raise ConfigError("give either 'data.eval_split' or 'data.eval_fraction', not both")
    if config.lora.enabled and config.model.freeze_backbone:
        raise ConfigError("'lora.enabled' trains adapters on the backbone, 'model.freeze_backbone' freezes it: "
                          "choose one")


def load_reward_config(path: str | Path, overrides: list[str] = (), cls: type = RewardConfig) -> RewardConfig:
    """A reward recipe with dotted overrides; relative data files may also sit beside the recipe."""
    config = load_section(cls, path, overrides, check)
    for attr in ("train_file", "eval_file"):
        setattr(config.data, attr, beside(Path(path).parent, getattr(config.data, attr)))
    return config


def _group_prefixes(sequences: list[list[int]], groups: Tensor, present: Tensor) -> Tensor:
    """(N,) for each sequence, the tokens it has in common with every other sequence of its group (a row of
    ``groups`` (B, K), positions in ``sequences``; ``present`` (B, K) marks the real members): a pair's or a
    list's shared prompt, computed once."""
    shared = torch.zeros(len(sequences), dtype=torch.long)
    for row, real in zip(groups.tolist(), present.tolist(), strict=True):
        members = list(dict.fromkeys(m for m, r in zip(row, real, strict=True) if r))
        if len(members) < 2:
            continue
        length = min(len(sequences[m]) for m in members)
        first = sequences[members[0]]
        common = next((i for i in range(length) if any(sequences[m][i] != first[i] for m in members)), length)
        for m in members:
            shared[m] = max(int(shared[m]), common)
    return shared


class TextRewards:
    """Rewards of texts by index: the head on cached pooled vectors (frozen backbone), else a forward pass
    over the distinct texts of the batch. ``forward`` is the model as the loop prepared it (gradients are
    synchronised through it); ``model`` the plain one, for pooling."""

    def __init__(self, model: RewardModel, texts: RewardTexts, tokenizer, config: RewardConfig, progress=None,
                 forward=None):
        self.model, self.texts, self.tokenizer = model, texts, tokenizer
        self.forward = forward or model
        self.pad_id, self.batch_size = tokenizer.pad_token_id, config.training.eval_batch_size
        self.packing = config.training.packing
        self.device = model.head.weight.device
        self.cache = None
        if config.model.freeze_backbone:
            self.cache = model.pooled_in_batches(texts.ids, self.pad_id, self.batch_size, progress)

    def __call__(self, index: Tensor, mask: Tensor | None = None) -> Tensor:
        """index: any shape of text indices -> rewards of the same shape. Groups ``(B, K)`` with their
        ``mask`` (B, K) share each group's common beginning (``training.packing``)."""
        unique, inverse = index.reshape(-1).unique(return_inverse=True)
        if self.cache is not None:
            rewards = self.forward(pooled=self.cache[unique])
        else:
            sequences = [self.texts.ids[i] for i in unique.tolist()]
            ids, attention = pad_batch(sequences, self.pad_id)
            shared = None
            if mask is not None and index.dim() == 2:
                shared = _group_prefixes(sequences, inverse.reshape(index.shape).cpu(), mask.cpu())
            rewards = self.forward(ids.to(self.device), attention.to(self.device), shared_prefix=shared,
                                   packing=self.packing)
        return rewards.float()[inverse].reshape(index.shape)

    @torch.no_grad()
    def of_texts(self, texts: list[str]) -> Tensor:
        """Rewards of rendered texts, adding (and, when frozen, pooling) the ones not seen yet."""
        new = [t for t in dict.fromkeys(texts) if t not in self.texts.index]
        if new:
            for text in new:
                self.texts.add(text)
            self.texts.ids += encode(self.tokenizer, self.model.meta, new)[0]
            if self.cache is not None:
                ids = self.texts.ids[-len(new) :]
                self.cache = torch.cat([self.cache, self.model.pooled_in_batches(ids, self.pad_id, self.batch_size)])
        index = torch.tensor([self.texts.index[t] for t in texts], device=self.device)
        return torch.cat([self(index[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)])


def _group_metrics(rewards: Tensor, mask: Tensor, scores: Tensor) -> dict[str, Tensor]:
    correct, compared = pairwise_accuracy(rewards, mask, scores)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    worst = torch.where(mask, positions, -1).max(dim=1).values
    margin = rewards[:, 0] - rewards.gather(1, worst[:, None]).squeeze(1)
    return {"correct": correct.sum(), "compared": compared.sum(), "margin": margin.sum()}


@torch.no_grad()
def evaluate_groups(rewards: TextRewards, groups: list[Group], batch_size: int, accelerator=None) -> dict[str, float]:
    """Held-out ``eval/loss`` (mean per list), ``eval/accuracy`` (pairwise), ``eval/margin`` (best - worst).
    With several processes (``accelerator``) each scores its share of every batch (``batch_size`` per process)
    and the sums are added across processes: every list counted once."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    sums = MeanAccumulator()
    for part in shards(sequential_batches(len(groups), batch_size * world), rank, world):
        index, mask, scores = stack_groups([groups[i] for i in part], rewards.device)
        values = rewards(index, mask)  # a stand-in runs too: the prepared model's forward may be collective
        if part.stand_in:
            continue
        metrics = _group_metrics(values, mask, scores)
        sums.add("loss", float(plackett_luce_loss(values, mask).sum()), len(part))
        sums.add("margin", float(metrics["margin"]), len(part))
        sums.add("accuracy", float(metrics["correct"]), float(metrics["compared"]))
    if accelerator is not None:
        sums = reduce_across(sums, accelerator)
    n, compared = sums.counts["loss"], sums.counts["accuracy"]
    return {"eval/loss": sums.sums["loss"] / n, "eval/accuracy": sums.sums["accuracy"] / max(compared, 1),
            "eval/margin": sums.sums["margin"] / n, "eval/examples": float(n), "eval/compared_pairs": compared}


class RewardTask:
    """A reward model (backbone + scalar head) trained on groups (pairs or ranked lists) of texts."""

    progress_metric = ("accuracy", "acc")

    def __init__(self, config: RewardConfig, model: RewardModel, tokenizer, texts: RewardTexts,
                 train: list[Group], held_out: list[Group]):
        self.config, self.module, self.tokenizer, self.texts = config, model, tokenizer, texts
        self.train, self.held_out, self.num_examples = train, held_out, len(train)

    def param_groups(self, loop: RewardTrainingConfig) -> list[dict]:
        head = list(self.module.head.parameters())
        groups = [{"params": head, "lr": loop.head_learning_rate or loop.learning_rate}]
        backbone = [p for p in self.module.backbone.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": loop.learning_rate})
        return groups

    def attach(self, module, accelerator, progress) -> None:
        def pooling(batches):
            return progress(batches, len(batches), "pooling (frozen backbone)")

        plain = accelerator.unwrap_model(module)
        self.device, self.accelerator = accelerator.device, accelerator
        self.rewards = TextRewards(plain, self.texts, self.tokenizer, self.config, pooling, forward=module)

    def micro_batch(self, positions: list[int]):
        return stack_groups([self.train[i] for i in positions], self.device)

    def loss(self, module, batch, step: int, micro: int, weight: float,
             stats: MeanAccumulator) -> tuple[Tensor, int]:
        index, mask, scores = batch
        values = self.rewards(index, mask)
        losses = plackett_luce_loss(values, mask)
        metrics = _group_metrics(values.detach(), mask, scores)
        stats.add("loss", float(losses.detach().sum()), len(losses))
        stats.add("accuracy", float(metrics["correct"]), max(float(metrics["compared"]), 1.0))
        stats.add("margin", float(metrics["margin"]), len(losses))
        tokens = sum(len(self.texts.ids[i]) for i in index[mask].unique().tolist())
        return losses.sum() * weight, tokens

    def evaluate(self, module) -> dict[str, float] | None:
        if not self.held_out:
            return None
        was_training = module.training
        module.eval()
        try:
            return evaluate_groups(self.rewards, self.held_out, self.config.training.eval_batch_size, self.accelerator)
        finally:
            module.train(was_training)

    def after_step(self, module, done: int, stats: MeanAccumulator) -> None:
        return None  # nothing moves between steps but the weights

    def checkpoint_state(self) -> tuple[dict, dict[str, Tensor]]:
        return {}, {}

    def restore_state(self, state: dict, tensors: dict[str, Tensor]) -> None:
        return None

    def fingerprint(self) -> dict:
        data = hashlib.sha256(json.dumps([self.texts.ids, [(g.texts, g.scores) for g in self.train + self.held_out]])
                              .encode()).hexdigest()
        return {"settings": settings(dataclasses.asdict(self.config)), "data": data,
                "model": model_identity(resolve_backbone(self.config.model.name_or_path))}

    def export(self, module: RewardModel, history: list[dict], whole=None) -> Path:  # never sharded
        """``final/``, written under a temporary name and renamed into place; LoRA adapters merged."""
        run_dir = Path(self.config.training.output_dir)
        final, tmp = run_dir / "final", run_dir / f".tmp-final-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        restore_frozen_linears(module.backbone, modeling.DTYPES[self.config.model.dtype])  # merging must not round
        if hasattr(module.backbone, "merge_and_unload"):
            module.backbone = module.backbone.merge_and_unload()  # the last use of this model
        module.save(tmp, self.tokenizer)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final


def build_model(config: RewardConfig, seed: int) -> RewardModel:
    """The backbone with a fresh head; LoRA adapters on it, or the backbone frozen, as configured."""
    model = RewardModel.from_backbone(config.model, config.data.chat_template, seed)
    if config.lora.enabled:
        model.backbone = modeling.add_lora(model.backbone, config.lora, task_type="FEATURE_EXTRACTION")
    else:
        model.backbone.requires_grad_(not config.model.freeze_backbone)
    return model


def train_reward(config: RewardConfig) -> RewardResult:
    """Train, evaluate and save; see the module docstring for what the run directory holds."""
    check(config)
    t = config.training
    run_dir = Path(t.output_dir)
    main = is_main_process()  # with several processes, the main one writes the files
    with run_log(run_dir):
        splits = load_reward_examples(config.data, t.seed, run_dir if main else None)  # bad data fails here
        if main:
            write_text(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        torch.manual_seed(t.seed)
        accelerator = modeling.make_accelerator(t.precision, tracker_names(t), run_dir)
        model = build_model(config, t.seed).to(accelerator.device)
        if t.precision == "bf16" and config.lora.enabled:  # LoRA's base: stored as autocast would use it
            prepare_for_bf16(model.backbone)
        tokenizer = load_reward_tokenizer(resolve_backbone(config.model.name_or_path), config.model.trust_remote_code)
        model.meta.chat_template = resolved_chat_template(config.data, splits.train + splits.eval, tokenizer)
        texts, train, held_out = build_groups(splits, tokenizer, model.meta)
        task = RewardTask(config, model, tokenizer, texts, train, held_out)
        with compute_kernels(t.precision, accelerator.device):
            run = Loop(t, task, accelerator, run_dir).fit()
    result = RewardResult(run_dir, run.final_dir, run.eval_before or {}, run.eval_after or {}, run.interrupted,
                          task.rewards)
    if not run.interrupted and main:
        write_json(run_dir / "reward_summary.json", {"eval_before": result.eval_before, "eval_after": result.eval_after,
                                                     "final_dir": str(run.final_dir)})
    return result


def print_metrics(title: str, metrics: dict | None) -> None:
    if metrics:
        print(title)
        for key, value in metrics.items():
            print(f"  {key:28s} {value:.4f}")


def command(args: argparse.Namespace) -> int:
    """The ``preftune reward`` handler."""
    result = train_reward(load_reward_config(args.config, args.overrides))
    if not is_main_process():  # launched on several processes: the main one reports
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted; a checkpoint is in {result.run_dir / 'checkpoints'} (run the same command to resume)")
        return 130
    print_metrics("held-out before training:", result.eval_before)
    print_metrics("held-out after training:", result.eval_after)
    print(f"run directory: {result.run_dir}\nreward model (judge type reward_model, path): {result.final_dir}")
    return 0

