"""Typed configuration: YAML + dotted ``key=value`` overrides -> dataclasses.

Every key and value is checked here, before any model loads: an unknown key names the closest valid one,
a bad value names the key and what is allowed. Objective parameters are checked against that objective's
own parameter type.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError


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
    # QLoRA: load the base weights through bitsandbytes (4bit: NF4 with double quantization) and train LoRA
    # adapters on top; needs lora.enabled. The matmuls compute in training.precision's dtype.
    quantization: Literal["4bit", "8bit"] | None = None


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
    # .jsonl, .json, .parquet, .csv, a datasets folder (save_to_disk, or data files), or a hub dataset name
    # (owner/name), read offline-first from the local datasets cache
    train_file: str = ""
    eval_file: str | None = None
    eval_fraction: float = 0.0  # held out from train_file when eval_file is not given
    split: str | None = None  # a dataset's split to train on (any name: train_prefs); default train
    eval_split: str | None = None  # held-out split (of eval_file, else of train_file); default test/validation
    subset: str | None = None  # a dataset's configuration (load_dataset's second argument)
    data_dir: str | None = None  # a dataset's folder of data files (load_dataset's data_dir)
    # canonical name -> column in the file, or a path into nested fields: info.post, summaries[choice].text
    columns: dict[str, str] = field(default_factory=dict)
    row_mapper: str | None = None  # "module:function" or "file.py:function" rewriting each row (a dict) first
    # read rows from disk when needed instead of holding the file in memory (.jsonl, .parquet, datasets)
    streaming: bool = False
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
    eval_batch_size: int = 16  # per process, like batch_size (with N processes an evaluation batch holds N x this)
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
    # bf16: autocast (AMX on recent CPUs); fp16: autocast + gradient scaler, GPUs only
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate at the end only (when there is a held-out split)
    eval_before_training: bool = True
    save_steps: int | None = 500
    save_total_limit: int | None = 2
    resume: str = "auto"  # auto | never | path to a checkpoint folder
    progress_bar: bool = True
    # experiment trackers, through accelerate, with the metric names of metrics.jsonl
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(
        default_factory=lambda: ["tensorboard"])
    tensorboard: bool = True  # false leaves tensorboard out of report_to
    tracker_project: str = "preftune"  # wandb / trackio project, mlflow experiment, tensorboard/<project>/
    tracker_kwargs: dict[str, Any] = field(default_factory=dict)  # per tracker: {wandb: {mode: offline}, ...}


@dataclass
class TrainingConfig(LoopConfig):
    # sDPO: N consecutive parts of the train split (or a list of files), each stage's model the next's reference
    stages: int | list[str] | None = None
    logps_chunk_size: int = 1024  # completion positions projected to the vocabulary at once
    # at each evaluation, greedy generations for this many fixed held-out prompts -> samples.jsonl + trackers
    sample_prompts: int = 0
    sample_max_new_tokens: int = 64


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


# Every config section is a plain dataclass, validated by pydantic in strict JSON mode: the YAML values are
# what JSON can say (strings, numbers, booleans, null, lists, mappings), so strict mode accepts exactly what a
# recipe means (an int where a float is asked; never "3" for an int, 1 for a bool) and rejects unknown keys.
_STRICT = ConfigDict(extra="forbid", strict=True)


def _sections(tp: Any):
    """Every dataclass type reachable from ``tp`` through fields, lists, unions and mappings."""
    if dataclasses.is_dataclass(tp):
        yield tp
        for hint in typing.get_type_hints(tp).values():
            yield from _sections(hint)
    else:
        for arg in typing.get_args(tp):
            yield from _sections(arg)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    for section in _sections(cls):
        if "__pydantic_config__" not in section.__dict__:
            section.__pydantic_config__ = _STRICT
    return TypeAdapter(cls)


def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _locate(cls: type, raw: Any, loc: tuple, prefix: str) -> tuple[str, Any, Any, type | None, str | None]:
    """Follow pydantic's error location through the types: (dotted key, its declared type, the value given,
    the section it sits in, the name of a key that section does not have)."""
    tp, value, key, section = cls, raw, prefix.rstrip("."), None
    for part in loc:
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(options) > 1:  # the rest of the location names a union branch: report the field itself
                break
            tp = options[0]
        if dataclasses.is_dataclass(tp):
            hints = _field_hints(tp)
            if part not in hints:
                return key, tp, value, tp, str(part)
            section, tp = tp, hints[part]
            value = value.get(part) if isinstance(value, dict) else None
            key = f"{key}.{part}" if key else str(part)
        elif isinstance(part, int):
            args = typing.get_args(tp)
            tp = args[0] if args else Any
            value = value[part] if isinstance(value, list) and part < len(value) else None
            key = f"{key}[{part}]"
        else:  # a mapping's value
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else Any
            value = value.get(part) if isinstance(value, dict) else None
            key = f"{key}.{part}"
    return key, tp, value, section, None


def _message(cls: type, raw: Any, error: dict, prefix: str) -> str:
    key, tp, value, section, unknown = _locate(cls, raw, error["loc"], prefix)
    if unknown is not None:
        names = [f.name for f in dataclasses.fields(tp) if not f.name.startswith("_")]
        where = f"{key}." if key else ""
        close = difflib.get_close_matches(unknown, names, n=1)
        hint = f" (did you mean '{where}{close[0]}'?)" if close else ""
        return f"unknown config key '{where}{unknown}'{hint}; allowed: {', '.join(names)}"
    if error["type"] in ("missing_argument", "missing"):
        return f"config key '{key}' is required"
    expected = "a mapping" if dataclasses.is_dataclass(tp) else _type_name(tp)
    return f"config key '{key}': expected {expected}, got {value!r}"


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}': expected a mapping, got {values!r}")
    try:
        return _adapter(cls).validate_json(json.dumps(values, default=str))
    except ValidationError as exc:
        messages = list(dict.fromkeys(_message(cls, values, error, prefix) for error in exc.errors()))
        raise ConfigError("\n  ".join(messages)) from None


def build_section(cls: type, values: dict, prefix: str = "") -> Any:
    """Build any config dataclass from a mapping with the same checks as the main config (unknown keys,
    typed values, error messages naming the dotted key). Commands with their own sections use this."""
    return _build(cls, values, prefix)


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (an exponent without a dot) as a string; recipes mean a number."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


def load_yaml(path: str | Path, overrides: list[str] = ()) -> dict:
    """A YAML file as a mapping with dotted overrides applied (values typed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
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
    """Set ``a.b.c`` in nested mappings. Setting a section's ``type`` to another kind replaces the section:
    its other keys belonged to the old kind (``judge.type=function`` over a chat-model judge)."""
    parts = dotted.split(".")
    if parts[-1] == "type" and len(parts) > 1:
        parent = tree
        for part in parts[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and parent.get("type") not in (None, value):
            parent.clear()
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
        pairs.append((key.strip(), parse_yaml(text) if text.strip() else None))
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
    unknown = sorted(set(t.tracker_kwargs) - {"tensorboard", "wandb", "mlflow", "trackio"})
    if unknown or not all(isinstance(v, dict) for v in t.tracker_kwargs.values()):
        raise ConfigError(f"config key '{section}.tracker_kwargs': expected a mapping from tensorboard, wandb, "
                          f"mlflow or trackio to that tracker's arguments, got {t.tracker_kwargs!r}")
    if t.warmup_steps < 0:
        raise ConfigError(f"config key '{section}.warmup_steps': must be >= 0, got {t.warmup_steps}")


def _check_quantization(config: Config) -> None:
    quantization = config.model.quantization
    if quantization is None:
        return
    if not config.lora.enabled:
        raise ConfigError(f"config key 'model.quantization' is {quantization!r} but lora.enabled is false: quantized "
                          "weights cannot be trained, so QLoRA trains LoRA adapters on top; set lora.enabled: true")
    if config.lora.save == "merged":
        raise ConfigError("config key 'lora.save': merged would fold the adapter into rounded (quantized) weights; "
                          "with model.quantization save the adapter (lora.save: adapter): final/ names the "
                          "unquantized base, into which it can be merged afterwards")
    if config.training.stages:
        raise ConfigError("config key 'training.stages': sDPO merges each stage's adapter into the model the next "
                          "stage starts from, which model.quantization would round; run the stages unquantized")


def validate(config: Config) -> None:
    """Cross-field checks; the objective's own parameters are validated by its parameter type."""
    t, d = config.training, config.data
    validate_loop(t)
    _positive("training.logps_chunk_size", t.logps_chunk_size, allow_none=False)
    _positive("training.sample_max_new_tokens", t.sample_max_new_tokens, allow_none=False)
    if t.sample_prompts < 0:
        raise ConfigError(f"config key 'training.sample_prompts': must be >= 0, got {t.sample_prompts}")
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
    if d.eval_split and d.eval_fraction:
        raise ConfigError("give either 'data.eval_split' or 'data.eval_fraction', not both")
    if d.streaming and d.ranked_to_pairs:
        raise ConfigError("'data.streaming' reads one row per example, but 'data.ranked_to_pairs' makes several "
                          "pairs of each row: turn one of them off")
    if d.streaming and isinstance(t.stages, int):
        raise ConfigError("'data.streaming' with 'training.stages: N': the stage files are cut from rows held in "
                          "memory; give the stages as a list of files, or turn streaming off")
    _positive("lora.r", config.lora.r, allow_none=False)
    _check_quantization(config)
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


def with_objective(config: Config, name: str) -> Config:
    """``config`` (already checked, its own objective included) training objective ``name`` instead, with that
    objective's default parameters and the recipe's modifiers, checked again: `preftune sft` on a DPO recipe."""
    objective = dataclasses.replace(config.objective, name=name, params={})
    switched = dataclasses.replace(config, objective=objective)
    try:
        validate(switched)
    except ConfigError as exc:
        raise ConfigError(f"with objective {name!r} instead of the recipe's {config.objective.name!r}: {exc}") from None
    return switched


def to_dict(config: Config) -> dict:
    """Plain nested dict, objective params written flat as in the YAML recipes."""
    raw = dataclasses.asdict(config)
    objective = raw["objective"]
    params = objective.pop("params")
    raw["objective"] = {**objective, **params}
    return raw


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def describe_options(config_type: type = None, prefix: str = "", defaults: Any = None,
                     expand: dict[str, Callable[[str, Any], list[str]]] | None = None) -> str:
    """Every key of a config dataclass (``Config`` by default) with its default, nested sections dotted. The
    defaults are read off a default instance, so a section's own defaults (e.g. a preset model) show.
    ``expand`` renders a free-form field by name (``params``: the objective's own parameters; ``judge``: each
    kind of judge and its keys) as ``expand[name](dotted prefix, the section holding it)`` lines."""
    config_type = config_type or Config
    defaults = config_type() if defaults is None else defaults
    lines = []
    for f in dataclasses.fields(config_type):
        if f.name.startswith("_"):
            continue
        value = getattr(defaults, f.name)
        if expand and f.name in expand:
            lines += expand[f.name](prefix, defaults)
            continue
        if dataclasses.is_dataclass(value):
            indent = prefix[: len(prefix) - len(prefix.lstrip())]
            lines.append(f"{prefix}{f.name}:")
            lines.append(describe_options(type(value), f"{indent}  {prefix.strip()}{f.name}.", value, expand))
            continue
        shown = repr(value)
        lines.append(f"{prefix}{f.name} = {shown if len(shown) <= 90 else shown[:87] + '...'}")
    return "\n".join(lines)
