"""``preftune reward CONFIG``: train a Bradley–Terry reward model (a scalar head on any backbone).

Pairs train with -log σ(r_c - r_r); ranked lists with Plackett–Luce, -Σ_k log softmax(r_k, ..., r_K) (see
``reward_losses``); a batch may hold both. The run directory holds ``config.yaml``, ``metrics.jsonl``
(``step``, ``loss``, ``accuracy``, ``lr``, ``grad_norm``; evaluation rows ``eval/loss``, ``eval/accuracy``,
``eval/margin``), ``reward_summary.json`` and ``final/``: the model, which loads back as the
``reward_model`` judge. Accuracy is pairwise: the fraction of ranked pairs with r_better > r_worse
(strictly; tied scores in a list are not pairs). With ``model.freeze_backbone`` only the head trains and
every text is pooled once, so an epoch costs a few matrix products.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import Tensor

from ..config import ConfigError, beside, load_section
from ..experiments.sentiment_pairs import SentimentPairsConfig, sign_accuracy, write_sentiment_pairs
from ..training.metrics import MetricsWriter
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
    render,
    resolve_backbone,
)

log = logging.getLogger("preftune")


@dataclass
class RewardTrainingConfig:
    output_dir: str = "runs/reward"
    seed: int = 42
    batch_size: int = 16  # pairs or ranked lists per optimizer step
    eval_batch_size: int = 64  # pairs or lists per evaluation batch; texts per batch when pooling a frozen backbone
    learning_rate: float = 1e-5  # the backbone's
    head_learning_rate: float | None = None  # null: learning_rate (a frozen backbone trains the head alone)
    weight_decay: float = 0.0
    lr_scheduler: Literal["constant", "linear"] = "linear"
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    max_grad_norm: float | None = 1.0
    logging_steps: int = 10
    eval_steps: int | None = None  # null: evaluate before training and at the end
    eval_before_training: bool = True
    progress_bar: bool = True


@dataclass
class RewardConfig:
    model: RewardBackboneConfig = field(default_factory=RewardBackboneConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    training: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)
    sentiment_pairs: SentimentPairsConfig = field(default_factory=SentimentPairsConfig)


@dataclass
class RewardResult:
    run_dir: Path
    final_dir: Path
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    sentiment: dict[str, float] | None = None


def _check(config: RewardConfig) -> None:
    t, s = config.training, config.sentiment_pairs
    if not config.model.name_or_path:
        raise ConfigError("config key 'model.name_or_path': no backbone to put the reward head on")
    if not config.data.train_file and not s.enabled:
        raise ConfigError("config key 'data.train_file': no pairs or ranked lists to train on")
    for key in ("batch_size", "eval_batch_size", "logging_steps", "learning_rate", "epochs"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"config key 'training.{key}': must be > 0, got {getattr(t, key)}")
    for key in ("max_steps", "eval_steps", "head_learning_rate", "max_grad_norm"):
        if getattr(t, key) is not None and getattr(t, key) <= 0:
            raise ConfigError(f"config key 'training.{key}': must be > 0 or null, got {getattr(t, key)}")
    if config.model.max_length < 2:
        raise ConfigError(f"config key 'model.max_length': must be >= 2, got {config.model.max_length}")
    if not 0 <= config.data.eval_fraction < 1 or not 0 < s.eval_fraction < 1:
        raise ConfigError("config keys 'data.eval_fraction' and 'sentiment_pairs.eval_fraction' must be in [0, 1)")
    if s.enabled and (s.min_gap <= 0 or s.pairs_per_snippet <= 0):
        raise ConfigError("config keys 'sentiment_pairs.min_gap' and 'sentiment_pairs.pairs_per_snippet' must be > 0")


def load_reward_config(path: str | Path, overrides: list[str] = ()) -> RewardConfig:
    """A reward recipe with dotted overrides; relative data files may also sit beside the recipe."""
    config = load_section(RewardConfig, path, overrides, _check)
    for attr in ("train_file", "eval_file"):
        setattr(config.data, attr, beside(Path(path).parent, getattr(config.data, attr)))
    return config


class TextRewards:
    """Rewards of texts by index: the head on cached pooled vectors (frozen backbone), else a forward pass
    over the distinct texts of the batch."""

    def __init__(self, model: RewardModel, texts: RewardTexts, tokenizer, config: RewardConfig, progress):
        self.model, self.texts, self.tokenizer = model, texts, tokenizer
        self.pad_id, self.batch_size = tokenizer.pad_token_id, config.training.eval_batch_size
        self.device = model.head.weight.device
        self.cache = None
        if config.model.freeze_backbone:
            self.cache = model.pooled_in_batches(texts.ids, self.pad_id, self.batch_size, progress)

    def __call__(self, index: Tensor) -> Tensor:
        """index: any shape of text indices -> rewards of the same shape."""
        unique, inverse = index.reshape(-1).unique(return_inverse=True)
        if self.cache is not None:
            rewards = self.model.score_pooled(self.cache[unique])
        else:
            ids, mask = pad_batch([self.texts.ids[i] for i in unique.tolist()], self.pad_id)
            rewards = self.model(ids.to(self.device), mask.to(self.device))
        return rewards[inverse].reshape(index.shape)

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
def evaluate_groups(rewards: TextRewards, groups: list[Group], batch_size: int) -> dict[str, float]:
    """Held-out ``eval/loss`` (mean per list), ``eval/accuracy`` (pairwise), ``eval/margin`` (best - worst)."""
    totals = {"loss": 0.0, "correct": 0.0, "compared": 0.0, "margin": 0.0}
    for start in range(0, len(groups), batch_size):
        index, mask, scores = stack_groups(groups[start : start + batch_size], rewards.device)
        values = rewards(index)
        totals["loss"] += float(plackett_luce_loss(values, mask).sum())
        for key, value in _group_metrics(values, mask, scores).items():
            totals[key] += float(value)
    n = len(groups)
    return {"eval/loss": totals["loss"] / n, "eval/accuracy": totals["correct"] / max(totals["compared"], 1),
            "eval/margin": totals["margin"] / n, "eval/examples": float(n), "eval/compared_pairs": totals["compared"]}


def _optimizer(model: RewardModel, config: RewardConfig, total_steps: int):
    t = config.training
    groups = [{"params": list(model.head.parameters()), "lr": t.head_learning_rate or t.learning_rate}]
    if not config.model.freeze_backbone:
        groups.append({"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": t.learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.lr_scheduler == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - t.warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batch(groups: list[Group], step: int, batch_size: int, seed: int) -> list[Group]:
    """The groups of optimizer step ``step`` (0-based): each epoch is a fresh seeded permutation."""
    per_epoch = math.ceil(len(groups) / batch_size)
    epoch, position = divmod(step, per_epoch)
    order = list(range(len(groups)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [groups[i] for i in order[position * batch_size : (position + 1) * batch_size]]


def _log_row(step: int, sums: dict[str, float], lr: float, grad_norm: float) -> dict:
    return {"step": step, "loss": sums["loss"] / sums["lists"], "accuracy": sums["correct"] / max(sums["compared"], 1),
            "margin": sums["margin"] / sums["lists"], "lr": lr, "grad_norm": grad_norm}


def train_loop(config: RewardConfig, model: RewardModel, rewards: TextRewards, train: list[Group],
               held_out: list[Group], writer: MetricsWriter) -> tuple[dict, dict]:
    """Optimizer steps over ``train``; returns the held-out metrics before and after (empty without a split)."""
    from tqdm.auto import tqdm

    t = config.training
    total = t.max_steps or max(1, math.ceil(t.epochs * math.ceil(len(train) / t.batch_size)))
    optimizer, scheduler = _optimizer(model, config, total)
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    if held_out and t.eval_before_training:
        before = evaluate_groups(rewards, held_out, t.eval_batch_size)
        writer.write({"step": 0, **before})
    sums: dict[str, float] = dict.fromkeys(("loss", "lists", "correct", "compared", "margin"), 0.0)
    model.train()
    bar = tqdm(range(1, total + 1), desc="reward model", unit="step", disable=not t.progress_bar)
    for step in bar:
        index, mask, scores = stack_groups(_batch(train, step - 1, t.batch_size, t.seed), rewards.device)
        values = rewards(index)
        losses = plackett_luce_loss(values, mask)
        losses.mean().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm or math.inf)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums["loss"] += float(losses.detach().sum())
        sums["lists"] += len(losses)
        for key, value in _group_metrics(values.detach(), mask, scores).items():
            sums[key] += float(value)
        if step % t.logging_steps == 0 or step == total:
            row = _log_row(step, sums, lr, float(grad_norm))
            writer.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}")
            sums = dict.fromkeys(sums, 0.0)
        if held_out and (step == total or (t.eval_steps and step % t.eval_steps == 0)):
            after = evaluate_groups(rewards, held_out, t.eval_batch_size)
            writer.write({"step": step, **after})
            model.train()
    model.eval()
    return before, after


def _sentiment_report(rewards: TextRewards, tokenizer, data, prompt: str) -> dict[str, float]:
    """Sign accuracy on the held-out snippets, the threshold calibrated on the train snippets."""
    def scored(items):
        texts = [render(tokenizer, rewards.model.meta, prompt, item.text) for item in items]
        return rewards.of_texts(texts).cpu(), torch.tensor([item.rating for item in items])

    return sign_accuracy(*scored(data.train), *scored(data.held_out))


def train_reward(config: RewardConfig) -> RewardResult:
    """Train, evaluate and save; see the module docstring for what the run directory holds."""
    from tqdm.auto import tqdm

    _check(config)
    t = config.training
    run_dir = Path(t.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sentiment = None
    if config.sentiment_pairs.enabled:
        sentiment = write_sentiment_pairs(config.sentiment_pairs, run_dir / "data")
        config.data.train_file, config.data.eval_file = str(sentiment.train_file), str(sentiment.eval_file)
        config.data.eval_fraction = 0.0
    splits = load_reward_examples(config.data, t.seed, run_dir)  # bad data fails before any model loads
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), encoding="utf-8")
    model = RewardModel.from_backbone(config.model, config.data.chat_template, t.seed)
    model.backbone.requires_grad_(not config.model.freeze_backbone)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_reward_tokenizer(resolve_backbone(config.model.name_or_path), config.model.trust_remote_code)
    model.meta.chat_template = resolved_chat_template(config.data, splits.train + splits.eval, tokenizer)
    texts, train, held_out = build_groups(splits, tokenizer, model.meta)
    def progress(batches):
        return tqdm(batches, desc="pooling (frozen backbone)", unit="batch", disable=not t.progress_bar)

    rewards = TextRewards(model, texts, tokenizer, config, progress)
    writer = MetricsWriter(run_dir, None, tensorboard=False)
    try:
        before, after = train_loop(config, model, rewards, train, held_out, writer)
    finally:
        writer.close()
    final = model.save(run_dir / "final", tokenizer)
    result = RewardResult(run_dir, final, before, after)
    if sentiment is not None:
        result.sentiment = _sentiment_report(rewards, tokenizer, sentiment, config.sentiment_pairs.prompt)
    summary = {"eval_before": before, "eval_after": after, "sentiment": result.sentiment, "final_dir": str(final)}
    (run_dir / "reward_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return result


def command(args: argparse.Namespace) -> int:
    """The ``preftune reward`` handler."""
    result = train_reward(load_reward_config(args.config, args.overrides))
    for title, metrics in (("held-out before training:", result.eval_before), ("held-out after training:", result.eval_after),
                           ("sentiment sign accuracy (held-out snippets):", result.sentiment)):
        if metrics:
            print(title)
            for key, value in metrics.items():
                print(f"  {key:28s} {value:.4f}")
    print(f"run directory: {result.run_dir}\nreward model (judge type reward_model, path): {result.final_dir}")
    return 0
