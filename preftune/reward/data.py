"""Reward-model data: validated pairs or ranked lists -> rendered texts (each tokenized once) and groups.

A *group* is one pair or one ranked list: the indices of its texts, best first, and their scores in the
same order (pairs: ``[1, 0]``). Texts are deduplicated, so a completion that appears in many pairs (the
snippet pairs reuse every snippet several times) is tokenized, and with a frozen backbone pooled, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..config import DataConfig
from ..data import DataSplits, PairExample, RankedExample, load_examples
from .model import RewardModelMeta, encode, render

log = logging.getLogger("preftune")


@dataclass
class RewardDataConfig:
    train_file: str = ""  # pairs (prompt, chosen, rejected) or ranked lists (prompt, completions, scores|ranks)
    eval_file: str | None = None
    eval_fraction: float = 0.0  # held out from train_file when eval_file is not given
    split: str | None = None  # as data.split of `preftune train`: a dataset's split (hub names, dataset folders)
    eval_split: str | None = None
    subset: str | None = None
    data_dir: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> column or nested path
    row_mapper: str | None = None  # "module:function" rewriting each row first
    on_invalid: Literal["error", "skip"] = "error"
    max_errors_reported: int = 20
    chat_template: bool | None = None  # None: the template for conversational rows (when the tokenizer has one)

    def as_data_config(self) -> DataConfig:
        return DataConfig(train_file=self.train_file, eval_file=self.eval_file, eval_fraction=self.eval_fraction,
                          split=self.split, eval_split=self.eval_split, subset=self.subset, data_dir=self.data_dir,
                          columns=dict(self.columns), row_mapper=self.row_mapper, on_invalid=self.on_invalid,
                          max_errors_reported=self.max_errors_reported, chat_template=self.chat_template)


@dataclass
class Group:
    texts: list[int]  # indices into RewardTexts.ids, best first
    scores: list[float]  # in the same order; equal scores are a tie (not counted in accuracy)


@dataclass
class RewardTexts:
    """Every distinct rendered text once, with its token ids."""

    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def add(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.texts)
            self.texts.append(text)
        return self.index[text]


def load_reward_examples(data: RewardDataConfig, seed: int, report_dir) -> DataSplits:
    """Pairs or ranked lists, validated with file:line errors by the training data loader."""
    splits = load_examples(data.as_data_config(), ("pairs", "ranked"), seed=seed, report_dir=report_dir,
                           objective="reward model")
    log.info("reward data: %d train and %d held-out %s from %s", len(splits.train), len(splits.eval),
             "pairs" if splits.shape == "pairs" else "ranked lists", data.train_file)
    return splits


def resolved_chat_template(data: RewardDataConfig, examples: list, tokenizer) -> bool | None:
    """What ``reward_model.json`` records, so that a judge renders as training did: data.chat_template when
    set; else whether the rows were conversations (all of them) with a template to render them, and None
    (decide per row) for a mix of text and conversations."""
    if data.chat_template is not None:
        return data.chat_template
    conversational = {isinstance(e.prompt, list) for e in examples}
    if len(conversational) != 1:
        return None
    return conversational.pop() and bool(getattr(tokenizer, "chat_template", None))


def _group(example, texts: RewardTexts, tokenizer, meta: RewardModelMeta) -> Group:
    if isinstance(example, PairExample):
        completions, scores = [example.chosen, example.rejected], [1.0, 0.0]
    elif isinstance(example, RankedExample):
        completions, scores = example.slots, example.ranked_scores
    else:
        raise TypeError(f"{example.source}: a reward model trains on pairs or ranked lists, not {example.shape}")
    return Group([texts.add(render(tokenizer, meta, example.prompt, c)) for c in completions], scores)


def build_groups(splits: DataSplits, tokenizer, meta: RewardModelMeta) -> tuple[RewardTexts, list[Group], list[Group]]:
    """(texts, train groups, held-out groups); truncated texts are counted in the log."""
    texts = RewardTexts()
    train = [_group(e, texts, tokenizer, meta) for e in splits.train]
    held_out = [_group(e, texts, tokenizer, meta) for e in splits.eval]
    texts.ids, truncated = encode(tokenizer, meta, texts.texts)
    if truncated:
        log.warning("%d of %d texts are longer than model.max_length=%d tokens: they keep their first token and "
                    "their last %d", truncated, len(texts.texts), meta.max_length, meta.max_length - 1)
    return texts, train, held_out


def stack_groups(groups: list[Group], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(text indices (B, K), mask (B, K), scores (B, K)) for groups of up to K texts; absent slots index
    text 0 (masked out)."""
    width = max(len(g.texts) for g in groups)
    index = torch.zeros(len(groups), width, dtype=torch.long)
    mask = torch.zeros(len(groups), width, dtype=torch.bool)
    scores = torch.zeros(len(groups), width, dtype=torch.float64)
    for row, group in enumerate(groups):
        n = len(group.texts)
        index[row, :n] = torch.tensor(group.texts)
        mask[row, :n] = True
        scores[row, :n] = torch.tensor(group.scores, dtype=torch.float64)
    return index.to(device), mask.to(device), scores.to(device)
