"""A reward model trained with ``preftune reward`` as a pointwise judge:
``judge: {type: reward_model, path: runs/reward/final}``.

Each (prompt, completion) is rendered and tokenized exactly as in training (``reward_model.json`` records
how), and scored without gradients in batches of similar lengths. The score is the raw Bradley–Terry reward:
only differences between scores mean something, which is all ``compare`` and ``preftune label`` use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ...config import ConfigError
from ...modeling import process_device
from ...reward.model import RewardModel, encode, load_reward_tokenizer, pad_batch, render
from . import PointwiseJudge, Prompt, check_lengths

TRUST_KEY = "judge.trust_remote_code"


@dataclass
class RewardModelJudgeConfig:
    path: str = ""  # the final/ folder of a `preftune reward` run
    batch_size: int = 32  # texts per forward pass
    dtype: Literal["float32", "bfloat16"] = "float32"
    include_prompt: bool | None = None  # null: as trained; true scores prompt + completion as one text
    trust_remote_code: bool = False  # run Python modules the folder ships (auto_map): only for a folder you trust


class RewardModelJudge(PointwiseJudge):
    Config = RewardModelJudgeConfig

    def __init__(self, config: RewardModelJudgeConfig):
        super().__init__()
        if not config.path:
            raise ConfigError("config key 'judge.path': the reward model folder (a `preftune reward` final/) is not set")
        if config.batch_size <= 0:
            raise ConfigError(f"config key 'judge.batch_size': must be > 0, got {config.batch_size}")
        self.config = config
        try:
            self.model = RewardModel.load(config.path, config.dtype, config.trust_remote_code, TRUST_KEY)
        except FileNotFoundError as exc:
            raise ConfigError(f"config key 'judge.path': {exc} (a published Hugging Face reward model, a "
                              "*ForSequenceClassification checkpoint, is judge type sequence_classifier)") from exc
        if config.include_prompt is not None:
            self.model.meta = dataclasses.replace(self.model.meta, include_prompt=config.include_prompt)
        self.model.to(process_device())  # each launched process its own GPU
        self.tokenizer = load_reward_tokenizer(config.path, config.trust_remote_code, TRUST_KEY)

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float | None]:
        check_lengths(prompts, completions)
        if not completions:
            return self.tally([])
        texts = [render(self.tokenizer, self.model.meta, p, c) for p, c in zip(prompts, completions, strict=True)]
        ids, _ = encode(self.tokenizer, self.model.meta, texts)
        device = self.model.head.weight.device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths: little padding
        scores = torch.empty(len(ids))
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            input_ids, mask = pad_batch([ids[i] for i in rows], self.tokenizer.pad_token_id)
            scores[rows] = self.model(input_ids.to(device), mask.to(device)).cpu()
        return self.tally([float(s) for s in scores])
