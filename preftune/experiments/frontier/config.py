"""The ``preftune frontier`` recipe: its sections, their checks, and each method's training ``Config``
(the experiment itself is ``preftune.experiments.frontier.run``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...config import ConfigError, LoraConfig, ModelConfig, beside, config_from_dict, load_section

RECIPES = Path(__file__).resolve().parents[3] / "configs"


@dataclass
class FrontierPromptsConfig:
    file: str = ""  # rated snippets (id<TAB>rating<TAB>text); "" = the bundled movie-review snippets
    train: int = 384  # prompts whose samples become preference pairs
    eval: int = 96  # held-out prompts every point is evaluated on
    min_words: int = 2  # prefix length in words, drawn uniformly in [min_words, max_words]
    max_words: int = 8
    seed: int = 0


@dataclass
class FrontierRewardConfig:
    path: str = ""  # a trained reward model (a `preftune reward` final/ folder); "" = train one with `recipe`
    recipe: str = "configs/reward_sentiment.yaml"  # a `preftune reward` recipe
    overrides: list[str] = field(default_factory=list)  # dotted overrides for that recipe
    batch_size: int = 64  # texts per reward-model forward pass when judging


@dataclass
class FrontierSamplingConfig:
    max_new_tokens: int = 20  # every continuation, for pairs and for evaluation
    batch_size: int = 32  # prompts per generate call
    dtype: Literal["float32", "bfloat16"] = "float32"  # float32 keeps the samples exactly from π (KL unbiased)
    seed: int = 0


@dataclass
class FrontierPairsConfig:
    num_samples: int = 4  # continuations per train prompt; the best and the worst make the pair
    temperature: float = 1.0
    top_p: float = 1.0
    min_margin: float = 0.0  # rewards closer than this are a tie: the prompt gives no pair (counted)


@dataclass
class FrontierEvalConfig:
    num_samples: int = 4  # samples per held-out prompt for every trained point
    best_of: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # Best-of-N points; [] = none
    kl_batch_size: int = 16


@dataclass
class FrontierMethodConfig:
    name: str = ""  # the point's label and folder name, e.g. dpo_beta0.1
    family: str = ""  # the plot groups points by family (dpo, ipo, ...); "" = the objective's name
    objective: dict[str, Any] = field(default_factory=dict)  # an objective section: {name: dpo, beta: 0.1}
    training: dict[str, Any] = field(default_factory=dict)  # training keys of this method (over the shared ones)


@dataclass
class FrontierConfig:
    output_dir: str = "runs/frontier"
    report_dir: str | None = None  # also copy frontier.{json,md,png} here (the repo keeps the small preset's)
    title: str = "Controlled sentiment generation"
    policy: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="builtin:SmolLM2-135M-Instruct"))
    prompts: FrontierPromptsConfig = field(default_factory=FrontierPromptsConfig)
    reward: FrontierRewardConfig = field(default_factory=FrontierRewardConfig)
    sampling: FrontierSamplingConfig = field(default_factory=FrontierSamplingConfig)
    pairs: FrontierPairsConfig = field(default_factory=FrontierPairsConfig)
    evaluation: FrontierEvalConfig = field(default_factory=FrontierEvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reference: dict[str, Any] = field(default_factory=lambda: {"precompute": True})  # shared reference section
    data: dict[str, Any] = field(default_factory=lambda: {"max_length": 64, "max_prompt_length": 32})
    training: dict[str, Any] = field(default_factory=dict)  # training keys shared by every method
    methods: list[FrontierMethodConfig] = field(default_factory=list)
    progress_bar: bool = True


def check(config: FrontierConfig) -> None:
    p, e = config.prompts, config.evaluation
    if not config.policy.name_or_path:
        raise ConfigError("config key 'policy.name_or_path': no starting policy")
    for key, value in (("prompts.train", p.train), ("prompts.eval", p.eval), ("prompts.min_words", p.min_words),
                       ("sampling.max_new_tokens", config.sampling.max_new_tokens),
                       ("sampling.batch_size", config.sampling.batch_size), ("evaluation.num_samples", e.num_samples),
                       ("reward.batch_size", config.reward.batch_size)):
        if value <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {value}")
    if p.max_words < p.min_words:
        raise ConfigError(f"config key 'prompts.max_words': must be >= prompts.min_words ({p.min_words}), got {p.max_words}")
    if config.pairs.num_samples < 2:
        raise ConfigError(f"config key 'pairs.num_samples': a pair needs 2 samples per prompt, got {config.pairs.num_samples}")
    if any(n <= 0 for n in e.best_of):
        raise ConfigError(f"config key 'evaluation.best_of': every n must be >= 1, got {e.best_of}")
    seen: set[str] = set()
    for i, method in enumerate(config.methods):
        if not method.name or "/" in method.name or method.name.startswith("."):
            raise ConfigError(f"config key 'methods[{i}].name': a folder name is needed, got {method.name!r}")
        if method.name in seen:
            raise ConfigError(f"config key 'methods[{i}].name': {method.name!r} is used twice")
        seen.add(method.name)
        if not method.objective.get("name"):
            raise ConfigError(f"config key 'methods[{i}].objective': needs at least a name, e.g. {{name: dpo, beta: 0.1}}")
    if not config.methods and not e.best_of:
        raise ConfigError("config keys 'methods' and 'evaluation.best_of' are both empty: there is nothing to plot")
    for i in range(len(config.methods)):  # every training config is checked before anything runs
        training_config(config, i, Path("pairs.jsonl"), Path(config.output_dir))


def load_frontier_config(path: str | Path, overrides: list[str] = ()) -> FrontierConfig:
    config = load_section(FrontierConfig, path, overrides, check)
    recipe_dir = Path(path).parent
    config.reward.recipe = beside(recipe_dir, config.reward.recipe)
    if not Path(config.reward.recipe).exists() and (RECIPES / Path(config.reward.recipe).name).exists():
        config.reward.recipe = str(RECIPES / Path(config.reward.recipe).name)  # an installed checkout's configs/
    config.prompts.file = beside(recipe_dir, config.prompts.file)
    return config


def training_config(config: FrontierConfig, index: int, pairs_file: Path, out: Path):
    """The full training ``Config`` of method ``index``: shared sections, then the method's own keys."""
    method = config.methods[index]
    raw = {
        "model": asdict(config.policy),
        "reference": dict(config.reference),
        "lora": asdict(config.lora),
        "data": {**config.data, "train_file": str(pairs_file)},
        "objective": dict(method.objective),
        "training": {"progress_bar": config.progress_bar, **config.training, **method.training,
                     "output_dir": str(out / "methods" / method.name)},
    }
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"methods[{index}] ({method.name}): {exc}") from exc
