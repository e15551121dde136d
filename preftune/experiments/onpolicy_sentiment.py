"""``preftune onpolicy-sentiment CONFIG``: on-policy rounds against one round of offline DPO, on the DPO paper's
controlled-sentiment task (the frontier's setup: SmolLM2-135M-Instruct continues movie-review prefixes, the
sentiment reward model trained on human ratings is the judge).

Each entry of ``methods`` is a ``preftune iterate`` recipe fragment run in ``methods/NAME/`` on the same train
prompts, judge and held-out prompts (``shared`` holds the keys every method has in common). A one-round method
with as many prompts as the rounds of another together, at the same batch size, takes the same number of
optimizer updates: offline DPO on samples of the starting policy. Every stage resumes (``onpolicy.stages``).
Outputs: ``report.json``, ``report.md`` and ``report.png`` (reward per round, and reward against KL(π‖π_0)),
copied to ``report_dir``.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_json, write_jsonl
from ..config import ConfigError, ModelConfig, build_section, load_section
from .frontier.config import FrontierPromptsConfig, FrontierRewardConfig


@dataclass
class OnPolicyMethod:
    name: str = ""  # folder and label
    iterate: dict[str, Any] = field(default_factory=dict)  # keys of the `preftune iterate` recipe (over `shared`)


@dataclass
class OnPolicySentimentConfig:
    output_dir: str = "runs/onpolicy_sentiment"
    report_dir: str | None = None
    policy: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="builtin:SmolLM2-135M-Instruct"))
    prompts: FrontierPromptsConfig = field(default_factory=lambda: FrontierPromptsConfig(train=384, eval=64))
    reward: FrontierRewardConfig = field(default_factory=FrontierRewardConfig)
    shared: dict[str, Any] = field(default_factory=dict)  # iterate keys every method shares
    methods: list[OnPolicyMethod] = field(default_factory=list)
    progress_bar: bool = True


def method_config(config: OnPolicySentimentConfig, index: int, out: Path, judge: dict):
    from ..onpolicy.rounds_config import IterateConfig, check

    method = config.methods[index]
    raw = _merge(copy.deepcopy(config.shared), method.iterate)
    raw.update(output_dir=str(out / "methods" / method.name), policy=asdict(config.policy), judge=judge,
               progress_bar=config.progress_bar)
    raw.setdefault("prompts", {}).update(file=str(out / "prompts" / "train.jsonl"), chat_template=False)
    raw.setdefault("evaluation", {})["prompts_file"] = str(out / "prompts" / "eval.jsonl")
    try:
        iterate = build_section(IterateConfig, raw)
        check(iterate)
    except ConfigError as exc:
        raise ConfigError(f"methods[{index}] ({method.name}): {exc}") from exc
    return iterate


def _merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        base[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return base


def check_config(config: OnPolicySentimentConfig) -> None:
    if not config.methods:
        raise ConfigError("config key 'methods': nothing to run")
    names = [m.name for m in config.methods]
    if any(not n or "/" in n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"config key 'methods': every method needs its own folder name, got {names}")
    placeholder = {"type": "function", "function": "math:fabs"}  # the real judge exists only after training it
    for i in range(len(config.methods)):
        method_config(config, i, Path(config.output_dir), placeholder)


def load_onpolicy_sentiment_config(path: str | Path, overrides: list[str] = ()) -> OnPolicySentimentConfig:
    from .frontier.config import RECIPES

    config = load_section(OnPolicySentimentConfig, path, overrides, check_config)
    recipe = Path(config.reward.recipe)
    if not recipe.exists() and (Path(path).parent / recipe).exists():
        config.reward.recipe = str(Path(path).parent / recipe)
    elif not recipe.exists() and (RECIPES / recipe.name).exists():
        config.reward.recipe = str(RECIPES / recipe.name)
    return config


def run(config: OnPolicySentimentConfig, judge=None) -> dict:
    """Every method's rounds; ``judge`` replaces the reward model (tests)."""
    from ..onpolicy.rounds import run_rounds
    from .frontier.run import make_prompts, reward_stage

    out = Path(config.output_dir)
    judge_section: dict = {"type": "function", "function": "math:fabs"}
    if judge is None:
        path, _ = reward_stage(_frontier_view(config), out)
        judge_section = {"type": "reward_model", "path": path, "include_prompt": True, "batch_size": config.reward.batch_size}
    train, held_out = make_prompts(config.prompts)
    write_jsonl(out / "prompts" / "train.jsonl", [{"prompt": p} for p in train])
    write_jsonl(out / "prompts" / "eval.jsonl", [{"prompt": p} for p in held_out])
    from ..feedback.judges import build_judge

    judge = judge or build_judge(judge_section)
    reports = {}
    for i, method in enumerate(config.methods):
        _share_start(out, config.methods[0].name, method.name)
        reports[method.name] = run_rounds(method_config(config, i, out, judge_section), judge=judge)
    from .onpolicy_report import write_report

    report = {"policy": config.policy.name_or_path, "judge": judge_section, "prompts": asdict(config.prompts),
              "methods": reports}
    write_json(out / "report.json", report)
    write_report(report, out)
    if config.report_dir:
        Path(config.report_dir).mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "report.md", "report.png"):
            shutil.copyfile(out / name, Path(config.report_dir) / name)
    return report


def _share_start(out: Path, first: str, name: str) -> None:
    """Every method starts from the same policy, sampled and judged the same way: the first method's round-0
    evaluation (its stage fingerprints hold) is copied instead of recomputed."""
    source, target = out / "methods" / first / "round-0", out / "methods" / name / "round-0"
    if name != first and (source / "evaluation" / "stage.json").is_file() and not target.exists():
        shutil.copytree(source, target)


def _frontier_view(config: OnPolicySentimentConfig):
    from .frontier.config import FrontierConfig

    return FrontierConfig(output_dir=config.output_dir, reward=config.reward)


def command(args: argparse.Namespace) -> int:
    """The ``preftune onpolicy-sentiment`` handler."""
    config = load_onpolicy_sentiment_config(args.config, args.overrides)
    run(config)
    where = Path(config.report_dir or config.output_dir)
    print((where / "report.md").read_text(encoding="utf-8"))
    return 0

