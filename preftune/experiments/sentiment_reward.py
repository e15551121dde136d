"""``preftune sentiment-reward CONFIG``: the ground-truth reward of the controlled-sentiment experiment.

A reward recipe plus a ``sentiment_pairs`` section: preference pairs are built from the rated movie snippets
(``sentiment_pairs``), ``preftune reward`` trains on them, and the held-out **sign accuracy** is measured
(reward above a threshold <-> rating above 0, the threshold chosen on the train snippets) and added to
``reward_summary.json`` under ``sentiment``. With ``sentiment_pairs.enabled: false`` it is an ordinary reward
run on the recipe's own data (the frontier accepts either).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import write_json
from ..config import ConfigError
from ..reward.model import render
from ..reward.train import RewardConfig, RewardResult, check, load_reward_config, print_metrics, train_reward
from .sentiment_pairs import SentimentData, SentimentPairsConfig, sign_accuracy, write_sentiment_pairs


@dataclass
class SentimentRewardConfig(RewardConfig):
    sentiment_pairs: SentimentPairsConfig = field(default_factory=lambda: SentimentPairsConfig(enabled=False))


def check_sentiment(config: SentimentRewardConfig) -> None:
    s = config.sentiment_pairs
    if s.enabled:
        if not 0 < s.eval_fraction < 1:
            raise ConfigError(f"config key 'sentiment_pairs.eval_fraction': must be in (0, 1), got {s.eval_fraction}")
        if s.min_gap <= 0 or s.pairs_per_snippet <= 0:
            raise ConfigError("config keys 'sentiment_pairs.min_gap' and 'sentiment_pairs.pairs_per_snippet' must "
                              "be > 0")
        if config.data.train_file:
            raise ConfigError("config key 'data.train_file': the sentiment pairs are the training data; leave it "
                              "empty (or set sentiment_pairs.enabled: false)")
        return
    check(config)


def load_sentiment_reward_config(path: str | Path, overrides: list[str] = ()) -> SentimentRewardConfig:
    from ..config import load_section

    config = load_section(SentimentRewardConfig, path, overrides, check_sentiment)
    if not config.sentiment_pairs.enabled:  # an ordinary reward recipe: resolve its data files as `reward` does
        return load_reward_config(path, overrides, cls=SentimentRewardConfig)
    return config


def _sign_report(result: RewardResult, data: SentimentData, prompt: str) -> dict[str, float]:
    """Sign accuracy on the held-out snippets, the threshold calibrated on the train snippets."""
    rewards = result.rewards

    def scored(items):
        texts = [render(rewards.tokenizer, rewards.model.meta, prompt, item.text) for item in items]
        return rewards.of_texts(texts).cpu(), torch.tensor([item.rating for item in items])

    return sign_accuracy(*scored(data.train), *scored(data.held_out))


def train_sentiment_reward(config: SentimentRewardConfig) -> tuple[RewardResult, dict | None]:
    """(the reward run's result, its sign-accuracy report or None without sentiment pairs)."""
    s = config.sentiment_pairs
    if not s.enabled:
        return train_reward(config), None
    data = write_sentiment_pairs(s, Path(config.training.output_dir) / "data")
    config.data.train_file, config.data.eval_file, config.data.eval_fraction = \
        str(data.train_file), str(data.eval_file), 0.0
    result = train_reward(config)
    if result.interrupted:
        return result, None
    sentiment = _sign_report(result, data, s.prompt)
    summary_file = result.run_dir / "reward_summary.json"
    write_json(summary_file, {**json.loads(summary_file.read_text(encoding="utf-8")), "sentiment": sentiment})
    return result, sentiment


def command(args: argparse.Namespace) -> int:
    """The ``preftune sentiment-reward`` handler."""
    result, sentiment = train_sentiment_reward(load_sentiment_reward_config(args.config, args.overrides))
    if result.interrupted:
        print(f"interrupted; a checkpoint is in {result.run_dir / 'checkpoints'} (run the same command to resume)")
        return 130
    print_metrics("held-out after training:", result.eval_after)
    print_metrics("sentiment sign accuracy (held-out snippets):", sentiment)
    print(f"run directory: {result.run_dir}\nreward model (judge type reward_model, path): {result.final_dir}")
    return 0
