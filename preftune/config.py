"""Typed configuration: YAML + dotted ``key=value`` overrides -> dataclasses.

Every key and value is checked here, before any model loads: an unknown key names the closest valid one,
a bad value names the key and what is allowed. Objective parameters are checked against that objective's
own parameter type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported with the dotted key it concerns."""


@dataclass
class ModelConfig:
    name_or_path: str = ""  # a Hugging Face model folder (or hub name when online)
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype the weights are loaded in
    gradient_checkpointing: bool = False
    dropout: bool = False  # keep the model's dropout; off by default so policy and reference see the same net
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    save: Literal["adapter", "merged"] = "adapter"  # what final/ holds


@dataclass
class ReferenceConfig:
    name_or_path: str | None = None  # default: a frozen copy of the starting model (adapters off with LoRA)
    precompute: bool = False  # compute reference log-probs once, cache on disk, free the reference model
    cache_dir: str = "~/.cache/preftune/reference"
    # TR-DPO (Gorbatovski et al. 2024): every sync_steps optimizer steps, ref <- alpha * policy + (1 - alpha) * ref
    sync_steps: int | None = None
    sync_alpha: float = 1.0  # 1.0 = hard update; the paper's soft updates use e.g. 0.6


@dataclass
class DataConfig:
    train_file: str = ""  # .jsonl, .json, .parquet, .csv or a datasets.save_to_disk folder
    eval_file: str | None = None
    eval_fraction: float = 0.0  # held out from train_file when eval_file is not given
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> column in the file
    max_length: int | None = 1024  # prompt + completion tokens
    max_prompt_length: int | None = 512  # the prompt keeps its end; unset: 512 or max_length // 2 if smaller
    on_invalid: Literal["error", "skip"] = "error"  # skip: bad rows are counted and written to a report
    strict_truncation: bool = False  # a pair whose completion truncation empties is an error, not a drop
    max_errors_reported: int = 20
    chat_template: bool | None = None  # None: use it for conversational rows only
    # A retain set (prompt/completion or messages) whose mean token NLL, times objective.retain_weight, is
    # added to the loss (NPO+RT); any objective can use it
    retain_file: str | None = None
    # Ranked lists (prompt, completions, scores|ranks) feeding an objective on pairs become pairs:
    ranked_to_pairs: Literal["all_pairs", "best_vs_worst", "best_vs_each"] | None = None


@dataclass
class ObjectiveConfig:
    name: str = "dpo"
    rpo_alpha: float = 0.0  # weight of the chosen NLL term added to any paired objective (RPO)
    ld_alpha: float | None = None  # LD-DPO: weight of the tokens past the shorter completion's length
    wpo: bool = False  # WPO: weight each pair by the policy's probability of generating it
    weight: float = 1.0  # weight of this objective when a mixture adds others
    retain_weight: float = 1.0  # λ of the retain-set NLL term (with data.retain_file)
    mixture: list[dict] = field(default_factory=list)  # more objectives to add: [{name: sft, weight: 0.5}, ...]
    params: dict[str, Any] = field(default_factory=dict)  # written flat in YAML: objective.beta, ...

    def plan(self):
        """The ``ObjectivePlan`` this section describes, built (and every parameter checked) once: validation
        builds it, and the run, its stages and its export reuse it while the section is unchanged."""
        from .objectives.plan import build_plan

        key = repr(dataclasses.astuple(self))
        cached = self.__dict__.get("_plan")
        if cached is None or cached[0] != key:
            plan = build_plan(self.name, self.params, rpo_alpha=self.rpo_alpha, ld_alpha=self.ld_alpha, wpo=self.wpo,
                              weight=self.weight, mixture=self.mixture)
            self.__dict__["_plan"] = cached = (key, plan)
        return cached[1]


@dataclass
class LoopConfig:
    """What the training loop itself needs, for every task it trains (policies, reward models)."""

    output_dir: str = "runs/preftune"
    seed: int = 42
    batch_size: int = 8  # examples (pairs, lists, ...) per device per micro-batch
    eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-7
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    max_grad_norm: float | None = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast (AMX on recent CPUs)
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate at the end only (when there is a held-out split)
    eval_before_training: bool = True
    save_steps: int | None = 500
    save_total_limit: int | None = 2
    resume: str = "auto"  # auto | never | path to a checkpoint folder
    progress_bar: bool = True
    tensorboard: bool = True


@dataclass
class TrainingConfig(LoopConfig):
    # sDPO: N consecutive parts of the train split (or a list of files), each stage's model the next's reference
    stages: int | list[str] | None = None
    logps_chunk_size: int = 1024  # completion positions projected to the vocabulary at once (fewer if vocab > 8k)
    # How rows go through the model (training/packing.py): prefix_shared computes each prompt once for all its
    # completions, without padding; padding_free only drops the padding; padded is the plain batch. Every
    # mode gives the same log-probs; models whose attention cannot be packed run padded.
    packing: Literal["prefix_shared", "padding_free", "padded"] = "prefix_shared"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


# ---------------------------------------------------------------- building typed values


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):  # a section inside a list, e.g. methods[2]
        return _build(tp, value, f"{key}.")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}': expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}; allowed: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


def build_section(cls: type, values: dict, prefix: str = "") -> Any:
    """Build any config dataclass from a mapping with the same checks as the main config (unknown keys,
    typed values, error messages naming the dotted key). Commands with their own sections use this."""
    return _build(cls, values, prefix)


def load_yaml(path: str | Path, overrides: list[str] = ()) -> dict:
    """A YAML file as a mapping with dotted overrides applied (values typed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value)
    return raw


def _split_objective(raw: dict) -> dict:
    """``objective: {name: dpo, beta: 0.1}`` -> ``{name: dpo, params: {beta: 0.1}}``."""
    raw = dict(raw or {})
    reserved = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    params = dict(raw.pop("params", {}) or {})
    params.update({k: raw.pop(k) for k in list(raw) if k not in reserved})
    raw["params"] = params
    return raw


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["training.lr=1e-5", "lora.enabled=true"]`` -> pairs with YAML-typed values."""
    pairs = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        pairs.append((key.strip(), yaml.safe_load(text) if text.strip() else None))
    return pairs


def config_from_dict(raw: dict, overrides: list[str] = (), base_dir: Path | None = None) -> Config:
    raw = dict(raw or {})
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value)
    if "objective" in raw:
        raw["objective"] = _split_objective(raw["objective"])
    config = _build(Config, raw, "")
    data = config.data
    prompt_limit_given = "max_prompt_length" in (raw.get("data") or {})
    if not prompt_limit_given and data.max_length and data.max_prompt_length and data.max_prompt_length >= data.max_length:
        data.max_prompt_length = max(1, data.max_length // 2)  # the default must leave room for completions
    validate(config)
    if base_dir is not None:
        _resolve_paths(config, base_dir)
    return config


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe, apply dotted overrides, check everything. Relative data paths resolve against
    the current directory first, then against the recipe's folder."""
    path = Path(path)
    raw = load_yaml(path)
    try:
        return config_from_dict(raw, overrides, base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def beside(recipe_dir: Path, value: str | None) -> str | None:
    """A relative file path resolves against the current directory first, then against the recipe's folder."""
    if value and not Path(value).exists() and (recipe_dir / value).exists():
        return str(recipe_dir / value)
    return value


def load_section(cls: type, path: str | Path, overrides: list[str] = (), check=None) -> Any:
    """A command's recipe: YAML + dotted overrides built into ``cls`` and checked by ``check(config)``; every
    ConfigError names the recipe file."""
    path = Path(path)
    try:
        config = build_section(cls, load_yaml(path, overrides))
        if check is not None:
            check(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return config


def _resolve_paths(config: Config, base_dir: Path) -> None:
    for attr in ("train_file", "eval_file", "retain_file"):
        setattr(config.data, attr, beside(base_dir, getattr(config.data, attr)))


def _positive(key: str, value: float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"config key '{key}': must be > 0, got {value!r}")


def validate_loop(t: LoopConfig, section: str = "training") -> None:
    """The loop's own settings, for any task's ``training`` section."""
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
        _positive(f"{section}.{key}", getattr(t, key), allow_none=False)
    for key in ("max_steps", "eval_steps", "save_steps", "save_total_limit", "max_grad_norm"):
        _positive(f"{section}.{key}", getattr(t, key))
    _positive(f"{section}.learning_rate", t.learning_rate, allow_none=False)
    _positive(f"{section}.epochs", t.epochs, allow_none=False)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"config key '{section}.warmup_ratio': must be in [0, 1), got {t.warmup_ratio}")
    if t.warmup_steps < 0:
        raise ConfigError(f"config key '{section}.warmup_steps': must be >= 0, got {t.warmup_steps}")


def validate(config: Config) -> None:
    """Cross-field checks; the objective's own parameters are validated by its parameter type."""
    t, d = config.training, config.data
    validate_loop(t)
    _positive("training.logps_chunk_size", t.logps_chunk_size, allow_none=False)
    if isinstance(t.stages, int) and t.stages < 1:
        raise ConfigError(f"config key 'training.stages': must be >= 1 or a list of data files, got {t.stages}")
    for key in ("max_length", "max_prompt_length", "max_errors_reported"):
        _positive(f"data.{key}", getattr(d, key))
    if d.max_length and d.max_prompt_length and d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"config key 'data.max_prompt_length' ({d.max_prompt_length}) must be smaller than "
            f"'data.max_length' ({d.max_length}) so that completions keep at least one token"
        )
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"config key 'data.eval_fraction': must be in [0, 1), got {d.eval_fraction}")
    if d.eval_file and d.eval_fraction:
        raise ConfigError("give either 'data.eval_file' or 'data.eval_fraction', not both")
    _positive("lora.r", config.lora.r, allow_none=False)
    _positive("reference.sync_steps", config.reference.sync_steps)
    if not 0 < config.reference.sync_alpha <= 1:
        raise ConfigError(f"config key 'reference.sync_alpha': must be in (0, 1], got {config.reference.sync_alpha}")
    try:
        objective = config.objective.plan()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config section 'objective': {exc}") from exc
    if config.reference.precompute and objective.needs_live_reference:
        raise ConfigError(
            f"objective {objective.name!r} looks at the reference token by token or on rows built per batch, "
            "but reference.precompute caches one sum per completion: set reference.precompute=false"
        )
    if config.objective.retain_weight < 0:
        raise ConfigError(f"config key 'objective.retain_weight': must be >= 0, got {config.objective.retain_weight}")
    if config.reference.sync_steps and config.reference.precompute:
        raise ConfigError("reference.sync_steps (TR-DPO) updates the reference during training, so its log-probs "
                          "cannot be precomputed: set reference.precompute=false")


def to_dict(config: Config) -> dict:
    """Plain nested dict, objective params written flat as in the YAML recipes."""
    raw = dataclasses.asdict(config)
    objective = raw["objective"]
    params = objective.pop("params")
    raw["objective"] = {**objective, **params}
    return raw


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def describe_options(config_type: type = None, prefix: str = "", defaults: Any = None) -> str:
    """Every key of a config dataclass (``Config`` by default) with its default, nested sections dotted. The
    defaults are read off a default instance, so a section's own defaults (e.g. a preset model) show."""
    config_type = config_type or Config
    defaults = config_type() if defaults is None else defaults
    lines = []
    for f in dataclasses.fields(config_type):
        if f.name.startswith("_"):
            continue
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{prefix}{f.name}:")
            lines.append(describe_options(type(value), f"  {prefix.strip()}{f.name}.", value))
            continue
        lines.append(f"{prefix}{f.name} = {value!r}")
    return "\n".join(lines)
