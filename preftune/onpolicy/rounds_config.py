"""The ``preftune iterate`` recipe: its sections and their checks (the driver is ``rounds.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, ModelConfig, load_section
from ..feedback.judges import judge_config
from .config import (
    OnPolicyEvalConfig,
    OnPolicyPromptsConfig,
    OnPolicySamplingConfig,
    check_positive,
    check_sampling,
    resolve_file,
    training_config,
)

# The objective each method trains with unless the recipe names another (of the same data shape).
DEFAULT_OBJECTIVES = {"iterative_dpo": "dpo", "dno": "dpo", "sppo": "sppo"}


@dataclass
class LabelsConfig:
    pointwise_as: Literal["hard", "bradley_terry"] = "hard"  # a pointwise judge's P(a ≻ b): 1/½/0, or σ(s_a - s_b)
    pairs: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst"  # iterative_dpo
    min_margin: float = 0.0  # iterative_dpo: win rates this close are a tie; dno: the win-rate margin a pair needs
    sppo_samples: Literal["winner_loser", "all"] = "winner_loser"  # sppo: which samples become scored rows
    teacher_file: str | None = None  # dno: prompt/completion rows; each prompt's teacher joins its samples
    chunk_size: int = 32  # prompts per judge call


@dataclass
class IterateConfig:
    output_dir: str = "runs/iterate"
    method: Literal["iterative_dpo", "dno", "sppo"] = "iterative_dpo"
    rounds: int = 2  # raising it continues a finished run with more rounds
    reference: Literal["round_start", "initial"] = "round_start"  # each round's reference policy
    prompts_per_round: int | None = None  # consecutive slices of the prompts (wrapping); null: all every round
    policy: ModelConfig = field(default_factory=ModelConfig)  # the starting policy π_0
    prompts: OnPolicyPromptsConfig = field(default_factory=OnPolicyPromptsConfig)
    sampling: OnPolicySamplingConfig = field(default_factory=OnPolicySamplingConfig)
    judge: dict[str, Any] = field(default_factory=dict)  # `type:` plus that judge's keys
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    train: dict[str, Any] = field(default_factory=dict)  # a `preftune train` recipe without model/data.train_file
    evaluation: OnPolicyEvalConfig = field(default_factory=OnPolicyEvalConfig)
    progress_bar: bool = True


def check(config: IterateConfig) -> None:
    if not config.policy.name_or_path:
        raise ConfigError("config key 'policy.name_or_path': no starting policy")
    if not config.prompts.file:
        raise ConfigError("config key 'prompts.file': no prompts to sample from")
    if not config.judge:
        raise ConfigError("config section 'judge' is missing; it needs at least a 'type'")
    judge_config(config.judge)
    if config.evaluation.judge:
        judge_config(config.evaluation.judge, "evaluation.judge.")
    check_positive({"rounds": config.rounds, "prompts_per_round": config.prompts_per_round,
                    "prompts.limit": config.prompts.limit, "labels.chunk_size": config.labels.chunk_size,
                    "evaluation.num_samples": config.evaluation.num_samples})
    check_sampling(config.sampling)
    if config.sampling.num_samples < 2 and not (config.method == "dno" and config.labels.teacher_file):
        raise ConfigError("config key 'sampling.num_samples': judging samples against each other needs at least 2")
    if config.labels.min_margin < 0:
        raise ConfigError(f"config key 'labels.min_margin': must be >= 0, got {config.labels.min_margin}")
    if config.method in ("dno", "sppo") and config.reference != "round_start":
        raise ConfigError(f"config key 'reference': {config.method} regresses towards π_t, the round's starting "
                          "policy (its reference by definition); use reference: round_start")
    if config.labels.teacher_file and config.method != "dno":
        raise ConfigError("config key 'labels.teacher_file': a teacher's completions join the samples in dno only")
    for key in ("model", "output_dir"):
        if key in config.train or key in (config.train.get("training") or {}):
            raise ConfigError(f"config key 'train.{key}' is set by the driver (policy.name_or_path, output_dir)")
    if (config.train.get("data") or {}).get("train_file"):
        raise ConfigError("config key 'train.data.train_file' is set by the driver: each round trains on its own rows")
    plan = round_training(config, 1, Path("rows.jsonl"), Path(config.output_dir)).objective.plan()
    wanted = "scored" if config.method == "sppo" else "pairs"
    if wanted not in plan.shapes:
        raise ConfigError(f"config key 'train.objective.name': {config.method} writes {wanted} rows; objective "
                          f"{plan.name!r} trains on {', '.join(plan.shapes)}")


def round_training(config: IterateConfig, round_number: int, rows: Path, out: Path, start: str | None = None):
    """Round ``round_number``'s training ``Config``: the recipe's ``train`` section, the round's starting policy
    and rows; with LoRA the result is merged, so the next round samples from (and starts at) a full model."""
    train = dict(config.train)
    train.setdefault("objective", {"name": DEFAULT_OBJECTIVES[config.method]})
    reference = config.policy.name_or_path if config.reference == "initial" and round_number > 1 else None
    fixed = {"model__name_or_path": start or config.policy.name_or_path, "model__dtype": config.policy.dtype,
             "data__train_file": str(rows), "training__output_dir": str(out / f"round-{round_number}" / "train"),
             "training__progress_bar": config.progress_bar, "reference__name_or_path": reference}
    if (train.get("lora") or {}).get("enabled"):
        fixed["lora__save"] = "merged"
    return training_config(train, "train", **fixed)


def load_iterate_config(path: str | Path, overrides: list[str] = ()) -> IterateConfig:
    config = load_section(IterateConfig, path, overrides, check)
    recipe_dir = Path(path).parent
    config.prompts.file = resolve_file(recipe_dir, config.prompts.file)
    config.evaluation.prompts_file = resolve_file(recipe_dir, config.evaluation.prompts_file)
    config.labels.teacher_file = resolve_file(recipe_dir, config.labels.teacher_file)
    return config
