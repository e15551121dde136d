"""Recipes: YAML + dotted ``key=value`` overrides -> a checked ``Config`` (or any command's section type), and
back: the resolved config written into a run, and every key listed with its default for ``--help``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .checks import validate
from .sections import Config, ConfigError, ObjectiveConfig
from .typed import build_section


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
    config = build_section(Config, raw)
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
