"""The ``preftune online`` recipe: an ordinary training recipe (model, lora, reference, data limits, objective,
training) whose data comes from the policy itself, plus an ``online:`` section saying where the prompts are,
how to sample and who judges."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import Config, ConfigError, build_section, config_from_dict, load_yaml
from ..feedback.judges import judge_config
from .config import (
    OnPolicyPromptsConfig,
    OnPolicySamplingConfig,
    check_positive,
    check_sampling,
    resolve_file,
)


@dataclass
class OnlineSection:
    method: Literal["online_dpo", "spo"] = "online_dpo"
    prompts: OnPolicyPromptsConfig = field(default_factory=OnPolicyPromptsConfig)
    sampling: OnPolicySamplingConfig = field(default_factory=lambda: OnPolicySamplingConfig(num_samples=2))
    judge: dict[str, Any] = field(default_factory=dict)
    min_margin: float = 0.0  # online_dpo: |P(a ≻ b) - ½| <= min_margin is a tie: the prompt is skipped (counted)
    pointwise_as: Literal["hard", "bradley_terry"] = "hard"  # a pointwise judge's P(a ≻ b): 1/½/0 or σ(s_a - s_b)
    spo_beta: float = 0.05  # spo: weight of the KL penalty towards the reference


@dataclass
class OnlineConfig:
    train: Config
    online: OnlineSection


@dataclass
class OnlineRecipe(Config):
    """Every key of a ``preftune online`` recipe, for ``--help``: a training recipe plus ``online``."""

    online: OnlineSection = field(default_factory=OnlineSection)


def check_online(config: Config, online: OnlineSection, raw: dict) -> None:
    if not online.prompts.file:
        raise ConfigError("config key 'online.prompts.file': no prompts to sample from")
    if not online.judge:
        raise ConfigError("config section 'online.judge' is missing; it needs at least a 'type'")
    judge_config(online.judge, "online.judge.")
    check_sampling(online.sampling, "online.sampling")
    check_positive({"online.spo_beta": online.spo_beta, "online.prompts.limit": online.prompts.limit})
    if online.min_margin < 0 or online.min_margin >= 0.5:
        raise ConfigError(f"config key 'online.min_margin': must be in [0, 0.5), got {online.min_margin}")
    if config.data.train_file or config.data.eval_file or config.data.eval_fraction:
        raise ConfigError("config keys 'data.train_file', 'data.eval_file', 'data.eval_fraction': online training "
                          "samples its own data from online.prompts.file (evaluate final/ with preftune winrate)")
    if config.reference.precompute:
        raise ConfigError("config key 'reference.precompute': online samples are new every step, so reference "
                          "log-probs cannot be precomputed; set it to false")
    if config.training.stages:
        raise ConfigError("config key 'training.stages': online training has no data file to cut into stages")
    if online.method == "online_dpo":
        if online.sampling.num_samples != 2:
            raise ConfigError(f"config key 'online.sampling.num_samples': online DPO samples two completions per "
                              f"prompt, got {online.sampling.num_samples}")
        if "pairs" not in config.objective.plan().shapes:
            raise ConfigError(f"config key 'objective.name': online DPO trains an objective on pairs; "
                              f"{config.objective.name!r} is not one")
    else:
        if "objective" in raw:
            raise ConfigError("section 'objective': spo's loss is fixed (policy gradient with a leave-one-out "
                              "baseline); set its KL weight with online.spo_beta and remove the objective section")
        if online.sampling.num_samples < 2:
            raise ConfigError("config key 'online.sampling.num_samples': spo's win rates need at least 2 samples")


def online_config_from_dict(raw: dict, base_dir: Path | None = None) -> OnlineConfig:
    raw = dict(raw)
    online = build_section(OnlineSection, raw.pop("online", None) or {}, "online.")
    config = config_from_dict(raw, base_dir=base_dir)
    check_online(config, online, raw)
    if base_dir is not None:
        online.prompts.file = resolve_file(base_dir, online.prompts.file)
    return OnlineConfig(config, online)


def load_online_config(path: str | Path, overrides: list[str] = ()) -> OnlineConfig:
    path = Path(path)
    try:
        return online_config_from_dict(load_yaml(path, overrides), path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
