"""``preftune rso CONFIG``: Statistical Rejection Sampling Optimization (Liu et al. 2024) end to end.

Stages (each in its own folder under ``output_dir``, resumable and fingerprinted like ``preftune iterate``):

1. ``reward/`` — a reward model trained on the human preference data (``reward.recipe``: a ``preftune reward``
   recipe; or ``reward.path``, one trained before). The paper trains a pairwise reward-ranking model and reads
   it against a baseline response; a Bradley–Terry reward model gives the pointwise r(x, y) Algorithm 1 needs
   directly (our choice).
2. ``candidates/`` — N samples per prompt from the SFT policy π_sft (``sampling.num_samples``).
3. ``rows/`` — the reward model scores every candidate; Algorithm 1 (``rso.rejection_sample``) keeps M of them
   (``rejection.num_samples``), approximately distributed as π* ∝ π_sft·exp(r/β) (β = ``rejection.beta``);
   a single-elimination tournament among the M (``rso.tournament_pairs``, "tournament-rank") labels M - 1 pairs
   by the reward model.
4. ``train/`` — the recipe's objective on those pairs from π_sft with π_sft as the reference: ``hinge`` (RSO's
   hinge-norm) or ``dpo`` (sigmoid-norm).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_jsonl
from ..config import ConfigError, ModelConfig, load_section
from ..feedback.judges import Judge, build_judge
from .config import (
    OnPolicyPromptsConfig,
    OnPolicySamplingConfig,
    check_positive,
    check_sampling,
    resolve_file,
    training_config,
)
from .rso import rejection_sample, tournament_pairs
from .selection import pair_row
from .stages import file_digest, run_stage
from .steps import sample_stage, train_stage, uses_template, write_prompts


@dataclass
class RSORewardConfig:
    recipe: str = ""  # a `preftune reward` recipe on the preference data, trained into output_dir/reward
    overrides: list[str] = field(default_factory=list)  # dotted overrides for that recipe
    path: str = ""  # or a trained reward model (a `preftune reward` final/ folder)
    batch_size: int = 32


@dataclass
class RejectionConfig:
    beta: float = 0.5  # β of π* ∝ π_sft·exp(r/β); the paper samples with the β it trains with
    num_samples: int = 8  # M accepted per prompt (≤ N candidates)
    seed: int = 0


@dataclass
class RSOConfig:
    output_dir: str = "runs/rso"
    policy: ModelConfig = field(default_factory=ModelConfig)  # π_sft: the proposal and the reference
    prompts: OnPolicyPromptsConfig = field(default_factory=OnPolicyPromptsConfig)
    sampling: OnPolicySamplingConfig = field(default_factory=lambda: OnPolicySamplingConfig(num_samples=16))
    reward: RSORewardConfig = field(default_factory=RSORewardConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    train: dict[str, Any] = field(default_factory=lambda: {"objective": {"name": "hinge", "beta": 0.5}})
    progress_bar: bool = True


def check(config: RSOConfig) -> None:
    if not config.policy.name_or_path:
        raise ConfigError("config key 'policy.name_or_path': no SFT policy to sample candidates from")
    if not config.prompts.file:
        raise ConfigError("config key 'prompts.file': no prompts")
    if bool(config.reward.recipe) == bool(config.reward.path):
        raise ConfigError("section 'reward': give exactly one of 'reward.recipe' (train one) and 'reward.path'")
    check_sampling(config.sampling)
    check_positive({"rejection.beta": config.rejection.beta, "rejection.num_samples": config.rejection.num_samples,
                    "reward.batch_size": config.reward.batch_size})
    if config.rejection.num_samples > config.sampling.num_samples:
        raise ConfigError(f"config key 'rejection.num_samples': M = {config.rejection.num_samples} accepted of "
                          f"N = {config.sampling.num_samples} candidates (sampling.num_samples) is impossible")
    if config.rejection.num_samples < 2:
        raise ConfigError("config key 'rejection.num_samples': a tournament needs at least 2 accepted samples")
    if (config.train.get("data") or {}).get("train_file") or "model" in config.train:
        raise ConfigError("config keys 'train.model' and 'train.data.train_file' are set by the driver")
    plan = _training(config, Path("rows.jsonl"), Path(config.output_dir)).objective.plan()
    if "pairs" not in plan.shapes:
        raise ConfigError(f"config key 'train.objective.name': RSO trains on pairs; {plan.name!r} does not")


def _training(config: RSOConfig, rows: Path, out: Path):
    return training_config(config.train, "train", model__name_or_path=config.policy.name_or_path,
                           model__dtype=config.policy.dtype, data__train_file=str(rows),
                           training__output_dir=str(out / "train"), training__progress_bar=config.progress_bar,
                           reference__name_or_path=None)


def load_rso_config(path: str | Path, overrides: list[str] = ()) -> RSOConfig:
    config = load_section(RSOConfig, path, overrides, check)
    recipe_dir = Path(path).parent
    config.prompts.file = resolve_file(recipe_dir, config.prompts.file)
    config.reward.recipe = resolve_file(recipe_dir, config.reward.recipe)
    return config


def reward_stage(config: RSOConfig, out: Path) -> str:
    if config.reward.path:
        return config.reward.path
    from ..reward.train import load_reward_config, train_reward

    recipe = load_reward_config(config.reward.recipe, [*config.reward.overrides, f"training.output_dir={out / 'reward'}"])

    def work() -> dict:
        result = train_reward(recipe)
        if result.interrupted:
            raise KeyboardInterrupt
        return {"final": str(result.final_dir), "eval_after": result.eval_after}

    return run_stage(out / "reward", {"reward": dataclasses.asdict(recipe)}, work)["final"]


def select_rows(generations, scores: list[list[float | None]], rejection: RejectionConfig) -> tuple[list[dict], dict]:
    """Algorithm 1 then the tournament, per prompt (each prompt's draw seeded by its position)."""
    rows, accepted_rewards, all_rewards, skipped = [], [], [], 0
    for position, (gen, rewards) in enumerate(zip(generations, scores, strict=True)):
        usable = [(t, r) for t, r in zip(gen.completions, rewards, strict=True) if r is not None and t.strip()]
        if len(usable) < 2:
            skipped += 1
            continue
        rng = random.Random(f"{rejection.seed}:{position}")
        picked = [usable[i] for i in rejection_sample([r for _, r in usable], rejection.num_samples, rejection.beta, rng)]
        all_rewards += [r for _, r in usable]
        accepted_rewards += [r for _, r in picked]
        for win, lose in tournament_pairs([r for _, r in picked], rng):
            if picked[win][0] != picked[lose][0] and picked[win][1] != picked[lose][1]:
                rows.append(pair_row(gen.prompt, picked[win][0], picked[lose][0], picked[win][1], picked[lose][1]))
    summary = {"rows": len(rows), "prompts": len(generations), "prompts_too_few_scored": skipped,
               "mean_reward_candidates": statistics.fmean(all_rewards) if all_rewards else None,
               "mean_reward_accepted": statistics.fmean(accepted_rewards) if accepted_rewards else None}
    return rows, summary


def run_rso(config: RSOConfig, judge: Judge | None = None) -> dict:
    """Every stage; ``judge`` replaces the reward model (tests pass a function judge)."""
    from ..evaluation.winrate import WinrateConfig, load_generations, score_file
    from ..feedback.generate import PromptsConfig, read_prompts

    check(config)
    out = Path(config.output_dir)
    reward_path = None if judge is not None else reward_stage(config, out)
    use_template = uses_template(config.policy.name_or_path, config.prompts.chat_template)
    p = config.prompts
    prompts_file = write_prompts(out / "prompts.jsonl", read_prompts(PromptsConfig(file=p.file, columns=p.columns,
                                                                                  limit=p.limit)), use_template)
    candidates = sample_stage(out / "candidates", config.policy.name_or_path, prompts_file, config.sampling, use_template,
                              progress=config.progress_bar)
    rows_file = out / "rows" / "rows.jsonl"

    def work() -> dict:
        scorer = judge or build_judge({"type": "reward_model", "path": reward_path, "batch_size": config.reward.batch_size})
        generations = load_generations(str(candidates))
        scores = score_file(scorer, generations, WinrateConfig(progress_bar=False, chunk_size=32))
        rows, summary = select_rows(generations.rows, scores, config.rejection)
        if not rows:
            raise ValueError(f"{candidates}: no pair could be formed (every prompt's candidates tied or unscored)")
        write_jsonl(rows_file, rows)
        return summary

    selected = run_stage(out / "rows", {"candidates": file_digest(candidates), "reward": reward_path,
                                        "rejection": dataclasses.asdict(config.rejection)}, work)
    trained = train_stage(_training(config, rows_file, out))
    return {"reward_model": reward_path, "rows": selected, "train": trained}


def command(args: argparse.Namespace) -> int:
    """The ``preftune rso`` handler."""
    config = load_rso_config(args.config, args.overrides)
    result = run_rso(config)
    print(f"{result['rows']['rows']} pairs from {result['rows']['prompts']} prompts (mean reward of the candidates "
          f"{result['rows']['mean_reward_candidates']:.3f}, of the accepted {result['rows']['mean_reward_accepted']:.3f})")
    print(f"final model: {result['train']['final']}")
    return 0
