"""Row shape checks: a raw row becomes a ``PairExample`` / ``CompletionExample`` or a list of problems.

Every problem in a row is collected, not only the first, and every row of a file is checked before
anything is raised: fixing a data file one error per run is the pain this module exists to remove.
A problem reads ``field 'chosen': expected ..., got ...``; the caller prefixes the row's source
(``train.jsonl:17``) so the user can open the file at that line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
CANONICAL_FIELDS = ("prompt", "chosen", "rejected", "completion", "messages")
CONTENT = "a non-empty string or a list of messages"


class DataValidationError(ValueError):
    """Data that does not have the shape training needs; the message names file, line and field."""


@dataclass(frozen=True)
class PairExample:
    source: str  # "train.jsonl:17", "train.json:item 3", "train.csv:5", "train.parquet:row 12"
    prompt: str | list[dict]
    chosen: str | list[dict]  # text, or the assistant message(s) that follow the prompt
    rejected: str | list[dict]


@dataclass(frozen=True)
class CompletionExample:
    source: str
    prompt: str | list[dict]
    completion: str | list[dict]


@dataclass(frozen=True)
class RowProblem:
    source: str
    problems: tuple[str, ...]
    row: Any  # the row as read (the raw text for a line that is not JSON), written to the skip report


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
    """A row read through ``data.columns``; labels name the user's column so errors point at the file."""

    def __init__(self, row: dict, columns: dict[str, str]):
        self.row, self.columns = row, columns

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def has(self, name: str) -> bool:
        return self.column(name) in self.row

    def get(self, name: str) -> Any:
        return self.row.get(self.column(name))

    def label(self, name: str) -> str:
        column = self.column(name)
        return f"'{column}'" if column == name else f"'{column}' ({name})"


def check_columns(columns: dict) -> None:
    """``data.columns`` maps canonical names to file columns; a typo there would read as 'missing field'."""
    for name, column in columns.items():
        if name not in CANONICAL_FIELDS:
            raise DataValidationError(
                f"data.columns: unknown field {name!r}; the keys are canonical names, one of "
                f"{', '.join(CANONICAL_FIELDS)} (the values are your file's column names)"
            )
        if not isinstance(column, str) or not column:
            raise DataValidationError(f"data.columns.{name}: expected a column name, got {describe_value(column)}")


def _missing(fields: Fields, name: str, expected: str = CONTENT) -> str:
    present = ", ".join(repr(k) for k in list(fields.row)[:8]) or "none"
    return f"field {fields.label(name)}: missing (expected {expected}); the row has fields {present}"


def _check_messages(messages: list, label: str, problems: list[str]) -> bool:
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


def _read_content(fields: Fields, name: str, problems: list[str]) -> str | list[dict] | None:
    """The field's value when it is non-empty text or a well-formed message list, else None (problem noted)."""
    if not fields.has(name):
        problems.append(_missing(fields, name))
        return None
    value, label = fields.get(name), fields.label(name)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list):
        return value if _check_messages(value, label, problems) else None
    problems.append(f"field {label}: expected {CONTENT}, got {describe_value(value)}")
    return None


def _kind(value: str | list) -> str:
    return "text" if isinstance(value, str) else "a list of messages"


def _mixed(fields: Fields, names: tuple[str, ...], values: tuple) -> list[str]:
    """Text and messages cannot be joined into one sequence: say which field is which and what fits."""
    if len({_kind(v) for v in values}) == 1:
        return []
    described = ", ".join(f"{fields.label(n)} is {_kind(v)}" for n, v in zip(names, values, strict=True))
    together = " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 2 else " and ".join(names)
    return [f"mixed formats: {described}; expected {together} all as text, or all as lists of messages"]


def _chat_disallowed(fields: Fields, names: tuple[str, ...], values: tuple, chat_template: bool | None) -> list[str]:
    for name, value in zip(names, values, strict=True):
        if chat_template is False and isinstance(value, list):
            return [
                f"field {fields.label(name)}: a list of messages needs the chat template, but data.chat_template "
                "is false; give text, or set data.chat_template to null"
            ]
    return []


def _check_turns(fields: Fields, name: str, messages: list[dict]) -> list[str]:
    """A rated (or trained) conversation ends with the assistant's turn; an empty one teaches nothing."""
    label = fields.label(name)
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


def _shared_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _prompt_already_in_conversations(prompt: Any, chosen: Any, rejected: Any) -> bool:
    """HuggingFaceH4/ultrafeedback_binarized style rows: a text ``prompt`` column beside full conversations
    that already start with it. The conversations carry the prompt, so the text copy is redundant."""
    if not (isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list)):
        return False
    shared = chosen[: _shared_prefix(chosen, rejected)]
    users = [m["content"] for m in shared if m["role"] == "user"]
    return bool(users) and users[-1].strip() == prompt.strip()


def _as_user(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _as_assistant(completion: str | list[dict]) -> list[dict]:
    return [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion


def _pair(fields: Fields, source: str, chat_template: bool | None) -> tuple[PairExample | None, list[str]]:
    problems: list[str] = []
    chosen = _read_content(fields, "chosen", problems)
    rejected = _read_content(fields, "rejected", problems)
    prompt = _read_content(fields, "prompt", problems) if fields.has("prompt") else None
    if not fields.has("prompt") and (isinstance(chosen, str) or isinstance(rejected, str)):
        problems.append(_missing(fields, "prompt", "a non-empty string; only pairs of message lists may leave it out"))
    if problems:
        return None, problems
    if _prompt_already_in_conversations(prompt, chosen, rejected):
        prompt = None
    names, values = ("chosen", "rejected"), (chosen, rejected)
    if prompt is not None:
        names, values = ("prompt", *names), (prompt, *values)
    problems = _mixed(fields, names, values) or _chat_disallowed(fields, names, values, chat_template)
    if not problems and chosen == rejected:
        problems = [f"fields {fields.label('chosen')} and {fields.label('rejected')} are identical; "
                    "a preference pair needs two different completions"]
    if problems:
        return None, problems
    if isinstance(chosen, list):
        if prompt is None:
            shared = _shared_prefix(chosen, rejected)
            if shared == 0:
                return None, [
                    f"fields {fields.label('chosen')} and {fields.label('rejected')} share no leading messages, "
                    "so there is no prompt; add a 'prompt' field or start both with the same prompt messages"
                ]
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        elif all(len(c) > len(prompt) and c[: len(prompt)] == prompt for c in (chosen, rejected)):
            # both conversations repeat the prompt column: [prompt, prompt, answer] would be a silent data bug
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        problems = _check_turns(fields, "chosen", chosen) + _check_turns(fields, "rejected", rejected)
        if problems:
            return None, problems
    elif chat_template:
        prompt, chosen, rejected = _as_user(prompt), _as_assistant(chosen), _as_assistant(rejected)
    return PairExample(source, prompt, chosen, rejected), []


def _from_messages(fields: Fields, problems: list[str]) -> tuple[list[dict], list[dict]] | None:
    """``messages`` -> (everything before the last message, [the last assistant message])."""
    messages, label = fields.get("messages"), fields.label("messages")
    if not isinstance(messages, list):
        problems.append(
            f"field {label}: expected a list of messages ending with an assistant message, got {describe_value(messages)}"
        )
        return None
    if not _check_messages(messages, label, problems):
        return None
    problems += _check_turns(fields, "messages", messages)
    if not problems and len(messages) < 2:
        problems.append(
            f"field {label}: expected at least one message (the prompt) before the final assistant message"
        )
    return None if problems else (messages[:-1], messages[-1:])


def _completion(fields: Fields, source: str, chat_template: bool | None) -> tuple[CompletionExample | None, list[str]]:
    problems: list[str] = []
    if fields.has("completion"):
        prompt = _read_content(fields, "prompt", problems)
        completion = _read_content(fields, "completion", problems)
        if problems:
            return None, problems
        names, values = ("prompt", "completion"), (prompt, completion)
        problems = _mixed(fields, names, values) or _chat_disallowed(fields, names, values, chat_template)
        if not problems and isinstance(completion, list):
            problems = _check_turns(fields, "completion", completion)
    elif fields.has("messages"):
        split = _from_messages(fields, problems)
        if split:
            prompt, completion = split
            problems = _chat_disallowed(fields, ("messages",), (prompt,), chat_template)
    else:
        present = ", ".join(repr(k) for k in list(fields.row)[:8]) or "none"
        problems = [
            f"missing fields: expected {fields.label('prompt')} and {fields.label('completion')}, or "
            f"{fields.label('messages')} (a list of messages); the row has fields {present}"
        ]
    if problems:
        return None, problems
    if chat_template and isinstance(prompt, str):
        prompt, completion = _as_user(prompt), _as_assistant(completion)
    return CompletionExample(source, prompt, completion), []


def validate_row(
    row: Any, source: str, shape: str, columns: dict[str, str], chat_template: bool | None
) -> tuple[PairExample | CompletionExample | None, list[str]]:
    """The example a row describes, or None and every problem found in it (source not included)."""
    if not isinstance(row, dict):
        expected = "prompt, chosen, rejected" if shape == "pairs" else "prompt and completion, or messages"
        return None, [f"expected an object with fields {expected}, got {describe_value(row)}"]
    fields = Fields(row, columns)
    if shape == "pairs":
        return _pair(fields, source, chat_template)
    return _completion(fields, source, chat_template)


def format_problems(header: str, lines: list[str], limit: int) -> str:
    """``header`` then at most ``limit`` problem lines, then how many were left out."""
    shown = lines[:limit]
    text = "\n".join([header, *(f"  {line}" for line in shown)])
    if len(lines) > len(shown):
        text += f"\n  ... and {len(lines) - len(shown)} more problems"
    return text


def invalid_rows_error(bad: list[RowProblem], total_rows: int, limit: int) -> DataValidationError:
    lines = [f"{row.source}: {problem}" for row in bad for problem in row.problems]
    header = (
        f"{len(bad)} of {total_rows} rows are invalid (fix them, or set data.on_invalid=skip to train on the "
        "valid rows and write the others to a report):"
    )
    return DataValidationError(format_problems(header, lines, limit))


def write_skip_report(path: Path, bad: list[RowProblem]) -> None:
    """One JSON object per skipped row so the user can grep, fix and re-add them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in bad:
            record = {"source": row.source, "problems": list(row.problems), "row": row.row}
            out.write(json.dumps(record, ensure_ascii=False, default=repr) + "\n")
