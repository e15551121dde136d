"""Any Hugging Face sequence-classification reward model as a pointwise judge, the way such models are
published to be used: ``judge: {type: sequence_classifier, path: Skywork/Skywork-Reward-V2-Qwen3-0.6B}``.

A model whose tokenizer has a chat template scores the conversation the template renders (the prompt as
the user's turn, or the prompt's messages, then the completion as the assistant's turn); one without (the
OpenAssistant DeBERTa reward models) scores the prompt and completion as a text pair, ``tokenizer(prompt,
completion)``. The score is the logit of ``judge.label``, or the model's only logit; only differences
between scores mean something. The folder must be a ``*ForSequenceClassification`` checkpoint: loading a
causal LM that way would put a randomly initialised head on it, so that is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from ... import modeling
from ...config import ConfigError
from . import PointwiseJudge, Prompt, check_lengths, render_prompt

TRUST_KEY = "judge.trust_remote_code"


@dataclass
class SequenceClassifierJudgeConfig:
    path: str = ""  # a folder or hub name that AutoModelForSequenceClassification loads
    label: int | str | None = None  # the logit that is the score: null = the only one; an index or id2label name
    batch_size: int = 8  # texts per forward pass
    max_length: int | None = None  # tokens per text; longer ones keep their first token and their end
    dtype: Literal["float32", "bfloat16"] = "float32"
    chat_template: bool | None = None  # null: the template when the tokenizer has one, else text pairs
    trust_remote_code: bool = False  # run Python modules the folder ships (auto_map): only for a folder you trust


def _label_index(config, label: int | str | None, path: str) -> int:
    names = {int(i): name for i, name in (config.id2label or {}).items()}
    shown = ", ".join(f"{i}: {name!r}" for i, name in sorted(names.items()))
    if label is None:
        if config.num_labels != 1:
            raise ConfigError(f"config key 'judge.label': {path} has {config.num_labels} outputs ({shown}); name the "
                              "one that is the score")
        return 0
    if isinstance(label, str):
        matches = [i for i, name in names.items() if name == label]
        if not matches:
            raise ConfigError(f"config key 'judge.label': {path} has no label {label!r}; its labels are {shown}")
        return matches[0]
    if not 0 <= label < config.num_labels:
        raise ConfigError(f"config key 'judge.label': {label} is out of range; {path} has labels {shown}")
    return label


def _load(config: SequenceClassifierJudgeConfig):
    """(model, tokenizer), after checking the folder holds a sequence classifier."""
    try:
        path = modeling.resolve(config.path)
    except ValueError as exc:
        raise ConfigError(f"config key 'judge.path': cannot load {config.path}: {exc}") from None
    with modeling.remote_code_refused(config.path, TRUST_KEY):
        try:
            model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        except OSError as exc:
            raise ConfigError(f"config key 'judge.path': cannot load {config.path}: {' '.join(str(exc).split())}") from exc
        architectures = getattr(model_config, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ConfigError(
                f"config key 'judge.path': {config.path} is a {' / '.join(architectures) or 'model'} checkpoint, not a "
                "sequence classifier (no *ForSequenceClassification architecture), so its score head would be random; "
                "a chat model judges with type: chat_model, a `preftune reward` model with type: reward_model")
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=modeling.DTYPES[config.dtype], trust_remote_code=config.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    return model.eval(), tokenizer


class SequenceClassifierJudge(PointwiseJudge):
    Config = SequenceClassifierJudgeConfig

    def __init__(self, config: SequenceClassifierJudgeConfig):
        super().__init__()
        if not config.path:
            raise ConfigError("config key 'judge.path': the reward model (a sequence classifier) is not set")
        for key in ("batch_size", "max_length"):
            value = getattr(config, key)
            if value is not None and value <= 0:
                raise ConfigError(f"config key 'judge.{key}': must be > 0, got {value}")
        self.config = config
        self.model, self.tokenizer = _load(config)
        self.label = _label_index(self.model.config, config.label, config.path)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if config.chat_template and not has_template:
            raise ConfigError(f"config key 'judge.chat_template': {config.path}'s tokenizer has no chat template")
        self.use_template = has_template if config.chat_template is None else config.chat_template
        # the model reads the last token that is not padding: without a pad id every text goes alone
        self.pad_id = self.model.config.pad_token_id
        self.model.to("cuda" if torch.cuda.is_available() else "cpu")

    def encode(self, prompt: Prompt, completion: str) -> dict[str, list[int]]:
        """Token ids (and token type ids for text pairs, when the tokenizer has them) of one judged text."""
        if self.use_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            text = self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                                      tokenize=False)
            encoded = dict(self.tokenizer(text, add_special_tokens=False))  # the template writes BOS itself
        else:
            encoded = dict(self.tokenizer(render_prompt(prompt), completion))
        limit = self.config.max_length
        if limit and len(encoded["input_ids"]) > limit:
            self.count("truncated")
            encoded = {k: v[:1] + v[len(v) - limit + 1 :] for k, v in encoded.items()}
        return {k: v for k, v in encoded.items() if k in ("input_ids", "token_type_ids")}

    def _forward(self, rows: list[dict[str, list[int]]]) -> torch.Tensor:
        width = max(len(r["input_ids"]) for r in rows)
        device = next(self.model.parameters()).device
        pad = self.pad_id if self.pad_id is not None else 0
        batch = {"input_ids": [r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows],
                 "attention_mask": [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]}
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = [r["token_type_ids"] + [0] * (width - len(r["token_type_ids"])) for r in rows]
        logits = self.model(**{k: torch.tensor(v, device=device) for k, v in batch.items()}).logits
        return logits[:, self.label].float().cpu()

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float | None]:
        check_lengths(prompts, completions)
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))  # little padding
        size = self.config.batch_size if self.pad_id is not None else 1
        scores = torch.empty(len(encoded))
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            scores[rows] = self._forward([encoded[i] for i in rows])
        return self.tally([float(s) for s in scores])
