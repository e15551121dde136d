"""Reading one field of a raw row: text or messages, labels and numbers, each problem worded for the user.

Every shape's validation is built from these pieces, so that a field is described the same way whatever the
shape: ``field 'chosen': expected ..., got ...``. The caller prefixes the row's source (``train.jsonl:17``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .columns import ColumnPaths

ROLES = ("system", "user", "assistant", "tool")
CONTENT = "a non-empty string or a list of messages"


class DataValidationError(ValueError):
    """Data that does not have the shape training needs; the message names file, line and field."""


def describe_value(value: Any, limit: int = 60) -> str:
    """A short rendering for "got ..." that says the type when the repr alone would not."""
    def short(text: str) -> str:
        return text if len(text) <= limit else text[: limit - 3] + "..."

    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{value!r} (a number)"
    if isinstance(value, str):
        return short(repr(value))
    rendered = short(json.dumps(value, ensure_ascii=False, default=repr))
    if isinstance(value, dict):
        return f"an object {rendered}"
    if isinstance(value, list):
        return f"a list {rendered}"
    return f"{type(value).__name__} {short(repr(value))}"


class Fields:
    """A row read through ``data.columns``; labels name the user's column so errors point at the file.

    ``text_cells``: the row comes from CSV, where every cell is text; fields that hold a label, a number or a
    list are then read as JSON in the cell (``true``, ``0.5``, ``["a", "b"]``).
    """

    def __init__(self, row: dict, columns: dict[str, str], text_cells: bool = False, paths: ColumnPaths | None = None):
        self.row, self.columns, self.text_cells = row, columns, text_cells
        self.paths = paths if paths is not None else ColumnPaths(columns)

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def has(self, name: str) -> bool:
        return self.paths.lookup(self.row, name, self.column(name))[0]

    def get(self, name: str) -> Any:
        return self.paths.lookup(self.row, name, self.column(name))[1]

    def why_missing(self, name: str) -> str | None:
        """Where a nested column's path stopped (``'summaries' has 2 items; index [choice=2] ...``)."""
        return self.paths.lookup(self.row, name, self.column(name))[2]

    def typed(self, name: str) -> Any:
        """The value of a non-text field (label, score, lists), decoded from a CSV cell's JSON text."""
        value = self.get(name)
        if not (self.text_cells and isinstance(value, str)):
            return value
        text = value.strip()
        if text.lower() in ("true", "false"):  # pandas writes Python's True/False
            return text.lower() == "true"
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value

    def cell_hint(self) -> str:
        return " (CSV cells of this field are read as JSON)" if self.text_cells else ""

    def label(self, name: str) -> str:
        column = self.column(name)
        return f"'{column}'" if column == name else f"'{column}' ({name})"

    def present(self) -> str:
        return ", ".join(repr(k) for k in list(self.row)[:8]) or "none"


def missing(fields: Fields, name: str, expected: str = CONTENT) -> str:
    why = fields.why_missing(name)
    if why:
        return f"field {fields.label(name)}: not found: {why} (expected {expected})"
    return f"field {fields.label(name)}: missing (expected {expected}); the row has fields {fields.present()}"


def check_messages(messages: list, label: str, problems: list[str]) -> bool:
    if not messages:
        problems.append(f"field {label}: empty message list; expected at least one {{role, content}} message")
        return False
    start = len(problems)
    for i, message in enumerate(messages, 1):
        where = f"message {i} of {label}"
        if not isinstance(message, dict):
            problems.append(f"{where}: expected an object with 'role' and 'content', got {describe_value(message)}")
            continue
        role, content = message.get("role"), message.get("content")
        if role is None:
            problems.append(f"{where} has no 'role'; expected one of {', '.join(ROLES)}")
        elif role not in ROLES:
            problems.append(f"unknown role {describe_value(role)} in {where}; expected one of {', '.join(ROLES)}")
        if "content" not in message:
            problems.append(f"{where} has no 'content'; expected a string")
        elif not isinstance(content, str):
            problems.append(f"{where}: 'content' must be a string, got {describe_value(content)}")
    return len(problems) == start


def content_value(value: Any, label: str, problems: list[str]) -> str | list[dict] | None:
    """``value`` when it is non-empty text or a well-formed message list, else None (problem noted)."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list):
        return value if check_messages(value, label, problems) else None
    problems.append(f"field {label}: expected {CONTENT}, got {describe_value(value)}")
    return None


def read_content(fields: Fields, name: str, problems: list[str]) -> str | list[dict] | None:
    if not fields.has(name):
        problems.append(missing(fields, name))
        return None
    return content_value(fields.get(name), fields.label(name), problems)


def is_number(value: Any) -> bool:
    """A finite int or float; booleans are not numbers here (``true`` as a score is a data bug)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def kind(value: str | list) -> str:
    return "text" if isinstance(value, str) else "a list of messages"


def mixed_formats(items: list[tuple[str, Any]], together: list[str]) -> list[str]:
    """Text and messages cannot be joined into one sequence: say which field is which and what fits.
    ``items`` are (label, value); ``together`` the canonical names for the "expected ..." part."""
    if len({kind(v) for _, v in items}) == 1:
        return []
    described = ", ".join(f"{label} is {kind(v)}" for label, v in items)
    joined = " and ".join([", ".join(together[:-1]), together[-1]]) if len(together) > 2 else " and ".join(together)
    return [f"mixed formats: {described}; expected {joined} all as text, or all as lists of messages"]


def chat_disallowed(items: list[tuple[str, Any]], chat_template: bool | None) -> list[str]:
    for label, value in items:
        if chat_template is False and isinstance(value, list):
            return [
                f"field {label}: a list of messages needs the chat template, but data.chat_template "
                "is false; give text, or set data.chat_template to null"
            ]
    return []


def check_turns(label: str, messages: list[dict]) -> list[str]:
    """A rated (or trained) conversation ends with the assistant's turn; an empty one teaches nothing."""
    if not messages:
        return [f"field {label}: no messages after the prompt; expected at least one assistant message"]
    last = messages[-1]
    if last["role"] != "assistant":
        return [
            f"field {label}: the conversation must end with an assistant message, but its last message "
            f"has role {last['role']!r}"
        ]
    if not last["content"].strip():
        return [f"field {label}: the final assistant message has empty content"]
    return []


def shared_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def as_user(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def as_assistant(completion: str | list[dict]) -> list[dict]:
    return [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
