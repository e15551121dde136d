"""Sections the on-policy drivers share: where the policy samples from, how it samples, how the result is
evaluated, and the training recipe fragment every training stage starts from."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import Config, ConfigError, config_from_dict


@dataclass
class OnPolicySamplingConfig:
    num_samples: int = 4  # K samples per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 16  # prompts per generate call
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class OnPolicyPromptsConfig:
    file: str = ""  # a `prompt` column (text or messages), as `preftune generate` reads
    columns: dict[str, str] = field(default_factory=dict)
    chat_template: bool | None = None  # null: when the policy's tokenizer has one (text prompts become user turns)
    limit: int | None = None  # only the first N prompts


@dataclass
class OnPolicyEvalConfig:
    prompts_file: str | None = None  # held-out prompts; null: no evaluation
    num_samples: int = 4  # samples per held-out prompt, at temperature 1 with top-p 1 (an unbiased KL estimate)
    judge: dict[str, Any] = field(default_factory=dict)  # {} = the training judge
    kl: bool = True  # KL(π‖π_start) from the samples (one forward of each model per sample)
    kl_batch_size: int = 16


def check_positive(values: dict[str, float | int | None]) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {value}")


def check_sampling(s: OnPolicySamplingConfig, prefix: str = "sampling") -> None:
    check_positive({f"{prefix}.num_samples": s.num_samples, f"{prefix}.max_new_tokens": s.max_new_tokens,
                    f"{prefix}.batch_size": s.batch_size})
    if s.temperature <= 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
        raise ConfigError(f"config section '{prefix}': on-policy samples need temperature > 0, 0 < top_p <= 1, "
                          f"top_k >= 0; got temperature={s.temperature}, top_p={s.top_p}, top_k={s.top_k}")


def training_config(train: dict, key: str, **fixed: Any) -> Config:
    """A full training ``Config`` from the recipe's ``train`` fragment plus ``fixed`` dotted settings (the
    driver's: model, data file, output folder, reference), checked like ``preftune train`` checks a recipe."""
    raw = copy.deepcopy(train)
    for dotted, value in fixed.items():
        section, _, name = dotted.partition("__")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config key '{key}.{section}': expected a mapping, got {raw[section]!r}")
        raw[section][name] = value
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"section '{key}': {exc}") from exc


def resolve_file(recipe_dir: Path, value: str | None) -> str | None:
    from ..config import beside

    return beside(recipe_dir, value)
