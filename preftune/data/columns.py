"""Where a field's value sits in a raw row: ``data.columns`` values are column names or paths into nested
fields, and ``data.row_mapper`` is a function that rewrites each row before validation.

A path is dotted names with list indices (TL;DR comparisons: ``prompt: info.post``, ``chosen:
summaries[choice].text``, ``rejected: summaries[1-choice].text``). An index is an integer, the value of
another field of the row (``[choice]``, a path from the row's top), or ``K-field`` (``[1-choice]``: the other
one of two). A column whose name holds a dot is still found by its exact name first.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_NAME = r"[^.\[\]]+"
_STEP = re.compile(rf"({_NAME})((?:\[[^\[\]]*\])*)")
_MINUS = re.compile(r"^\s*(\d+)\s*-\s*(.+?)\s*$")


class PathError(ValueError):
    """A path that cannot be read in a row; the message says which part failed and why."""


@dataclass(frozen=True)
class Index:
    """``[2]``, ``[choice]`` or ``[1-choice]``: ``constant + sign * (the row value at field)``."""

    constant: int = 0
    field: tuple | None = None  # the parsed path of the row value, from the row's top; None: a constant
    sign: int = 1
    text: str = ""  # as written, for messages

    def value(self, row: Any) -> int:
        if self.field is None:
            return self.constant
        found = resolve(row, self.field)
        if not isinstance(found, int) or isinstance(found, bool):
            raise PathError(f"the index [{self.text}] reads {found!r}; expected an integer")
        return self.constant + self.sign * found


@functools.lru_cache(maxsize=256)  # rows are read one by one: parse each distinct path once
def parse(path: str) -> tuple:
    """``"summaries[choice].text"`` -> (("summaries", (Index,)), ("text", ())); raises PathError."""
    if not path or path.startswith(".") or path.endswith(".") or ".." in path:
        raise PathError(f"{path!r} is not a column path (names joined by dots, e.g. info.post)")
    steps = []
    for part in path.split("."):
        match = _STEP.fullmatch(part)
        if match is None:
            raise PathError(f"{path!r} is not a column path: cannot read {part!r} (e.g. summaries[choice].text)")
        indices = tuple(_index(text) for text in re.findall(r"\[([^\[\]]*)\]", match.group(2)))
        steps.append((match.group(1), indices))
    return tuple(steps)


def _index(text: str) -> Index:
    stripped = text.strip()
    if re.fullmatch(r"-?\d+", stripped):
        return Index(int(stripped), None, 1, stripped)
    minus = _MINUS.match(stripped)
    if minus:
        return Index(int(minus.group(1)), parse(minus.group(2)), -1, stripped)
    if not stripped:
        raise PathError("an empty index []: expected an integer or a field name, e.g. [0] or [choice]")
    return Index(0, parse(stripped), 1, stripped)


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def resolve(row: Any, steps: tuple) -> Any:
    """The value ``steps`` (from ``parse``) lead to in ``row``; PathError says where it stopped."""
    value, where = row, ""
    for name, indices in steps:
        if not isinstance(value, dict):
            raise PathError(f"'{where}' is {_kind(value)}, not an object with a field {name!r}")
        if name not in value:
            present = ", ".join(repr(k) for k in list(value)[:8]) or "none"
            raise PathError(f"{repr(where) + ' has' if where else 'the row has'} no field {name!r} (fields: {present})")
        value, where = value[name], f"{where}.{name}" if where else name
        for index in indices:
            if not isinstance(value, list):
                raise PathError(f"'{where}' is {_kind(value)}, not a list to index with [{index.text}]")
            position = index.value(row)
            shown = index.text if index.field is None else f"{index.text}={position}"
            if not -len(value) <= position < len(value):
                raise PathError(f"'{where}' has {len(value)} items; index [{shown}] is out of range")
            value, where = value[position], f"{where}[{index.text}]"
    return value


class ColumnPaths:
    """Paths of ``data.columns`` parsed once; plain column names are looked up directly."""

    def __init__(self, columns: dict[str, str]):
        self.steps = {name: parse(column) for name, column in columns.items() if _is_path(column)}

    def lookup(self, row: dict, name: str, column: str) -> tuple[bool, Any, str | None]:
        """(found, value, why not found)."""
        if column in row or name not in self.steps:
            return column in row, row.get(column), None
        try:
            return True, resolve(row, self.steps[name]), None
        except PathError as exc:
            return False, None, str(exc)


def _is_path(column: str) -> bool:
    return "." in column or "[" in column


def check_path(column: str) -> str | None:
    """A problem with a ``data.columns`` value, or None when it is a name or a well-formed path."""
    if not _is_path(column):
        return None
    try:
        parse(column)
    except PathError as exc:
        return str(exc)
    return None


def map_row(mapper: Callable[[dict], dict], value: Any) -> tuple[Any, str | None]:
    """(the mapped row, None) or (the row as read, the problem): ``data.row_mapper`` must return an object."""
    try:
        mapped = mapper(value)
    except Exception as exc:  # the user's function: any failure is this row's problem, named with the row
        return value, f"data.row_mapper raised {type(exc).__name__}: {exc}"
    if not isinstance(mapped, dict):
        return value, f"data.row_mapper returned {_kind(mapped)}, expected an object (a dict of fields)"
    return mapped, None
