"""Building a section's dataclass from a recipe's mapping: pydantic validates it in strict JSON mode, and its
errors become preftune's: the dotted key, the closest valid key, the type or values allowed."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from .sections import ConfigError


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
