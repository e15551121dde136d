"""Row shape checks: a raw row becomes an example of its shape, or a list of problems.

Every problem in a row is collected, not only the first, and every row of a file is checked before
anything is raised: fixing a data file one error per run is the pain this module exists to remove.
A problem reads ``field 'chosen': expected ..., got ...``; the caller prefixes the row's source
(``train.jsonl:17``) so the user can open the file at that line. Pairs and single completions are checked
here; the other shapes (unpaired, scored, negatives, ranked, samples) in ``validate_groups``.
"""

from __future__ import annotations

from typing import Any

from .columns import ColumnPaths, check_path
from .examples import CompletionExample, Example, PairExample
from .fields import (
    DataValidationError,
    Fields,
    as_assistant,
    as_user,
    chat_disallowed,
    check_messages,
    check_turns,
    describe_value,
    missing,
    mixed_formats,
    read_content,
    shared_prefix,
)
from .transcripts import FORMAT, looks_like_transcript, parse_transcript, split_transcripts
from .validate_groups import GROUP_VALIDATORS

CANONICAL_FIELDS = (
    "prompt", "chosen", "rejected", "completion", "messages", "label", "score", "completions", "scores", "ranks",
    "samples",
)
# What a row of each shape holds, for "expected an object with fields ..." and shape-mismatch errors.
SHAPE_FIELDS = {
    "pairs": "prompt, chosen, rejected",
    "completions": "prompt and completion, or messages",
    "unpaired": "prompt, completion, label",
    "scored": "prompt, completion, score",
    "negatives": "prompt, rejected",
    "negatives_with_samples": "prompt, rejected, samples",
    "ranked": "prompt, completions, and scores or ranks",
}


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
        problem = check_path(column)
        if problem:
            raise DataValidationError(f"data.columns.{name}: {problem}")


def _labelled(fields: Fields, names: tuple[str, ...], values: tuple) -> list[tuple[str, Any]]:
    return [(fields.label(name), value) for name, value in zip(names, values, strict=True)]


def _prompt_already_in_conversations(prompt: Any, chosen: Any, rejected: Any) -> bool:
    """HuggingFaceH4/ultrafeedback_binarized style rows: a text ``prompt`` column beside full conversations
    that already start with it. The conversations carry the prompt, so the text copy is redundant."""
    if not (isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list)):
        return False
    shared = chosen[: shared_prefix(chosen, rejected)]
    users = [m["content"] for m in shared if m["role"] == "user"]
    return bool(users) and users[-1].strip() == prompt.strip()


def _split_conversations(fields: Fields, prompt, chosen: list, rejected: list):
    """(prompt, chosen, rejected) with the prompt messages taken out of the conversations, or problems."""
    if prompt is None:
        shared = shared_prefix(chosen, rejected)
        if shared == 0:
            return [
                f"fields {fields.label('chosen')} and {fields.label('rejected')} share no leading messages, "
                "so there is no prompt; add a 'prompt' field or start both with the same prompt messages"
            ]
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif all(len(c) > len(prompt) and c[: len(prompt)] == prompt for c in (chosen, rejected)):
        # both conversations repeat the prompt column: [prompt, prompt, answer] would be a silent data bug
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    problems = check_turns(fields.label("chosen"), chosen) + check_turns(fields.label("rejected"), rejected)
    return problems or (prompt, chosen, rejected)


def _identical(fields: Fields) -> list[str]:
    return [f"fields {fields.label('chosen')} and {fields.label('rejected')} are identical; "
            "a preference pair needs two different completions"]


def _transcript_pair(fields: Fields, source: str, chosen: str, rejected: str,
                     chat_template: bool | None) -> tuple[PairExample | None, list[str]]:
    """Anthropic HH rows: two whole dialogues, the turns they share being the prompt (``transcripts``)."""
    chosen_turns, problems = parse_transcript(chosen, fields.label("chosen"))
    rejected_turns, more = parse_transcript(rejected, fields.label("rejected"))
    problems += more
    if problems:
        return None, problems
    if chosen_turns == rejected_turns:
        return None, _identical(fields)
    split = split_transcripts(chosen_turns, rejected_turns, as_text=chat_template is False)
    if split is None:
        return None, [f"fields {fields.label('chosen')} and {fields.label('rejected')} are transcripts that share "
                      "no turn, so there is no prompt; both should open with the same Human turn"]
    return PairExample(source, *split), []


def _pair(fields: Fields, source: str, chat_template: bool | None) -> tuple[PairExample | None, list[str]]:
    problems: list[str] = []
    chosen = read_content(fields, "chosen", problems)
    rejected = read_content(fields, "rejected", problems)
    # a prompt column named in data.columns must be there; otherwise it may be left out (see below)
    prompt = read_content(fields, "prompt", problems) if fields.has("prompt") or "prompt" in fields.columns else None
    texts = isinstance(chosen, str) and isinstance(rejected, str)
    if not fields.has("prompt") and not problems and texts and any(map(looks_like_transcript, (chosen, rejected))):
        return _transcript_pair(fields, source, chosen, rejected, chat_template)
    if not fields.has("prompt") and "prompt" not in fields.columns and (isinstance(chosen, str) or isinstance(rejected, str)):
        problems.append(missing(fields, "prompt", "a non-empty string; only pairs of message lists or Anthropic HH "
                                                  f"transcripts ({FORMAT}) may leave it out"))
    if problems:
        return None, problems
    if _prompt_already_in_conversations(prompt, chosen, rejected):
        prompt = None
    names, values = ("chosen", "rejected"), (chosen, rejected)
    if prompt is not None:
        names, values = ("prompt", *names), (prompt, *values)
    items = _labelled(fields, names, values)
    problems = mixed_formats(items, list(names)) or chat_disallowed(items, chat_template)
    if not problems and chosen == rejected:
        problems = _identical(fields)
    if problems:
        return None, problems
    if isinstance(chosen, list):
        split = _split_conversations(fields, prompt, chosen, rejected)
        if isinstance(split, list):
            return None, split
        prompt, chosen, rejected = split
    elif chat_template:
        prompt, chosen, rejected = as_user(prompt), as_assistant(chosen), as_assistant(rejected)
    return PairExample(source, prompt, chosen, rejected), []


def _from_messages(fields: Fields, problems: list[str]) -> tuple[list[dict], list[dict]] | None:
    """``messages`` -> (everything before the last message, [the last assistant message])."""
    messages, label = fields.get("messages"), fields.label("messages")
    if not isinstance(messages, list):
        problems.append(
            f"field {label}: expected a list of messages ending with an assistant message, got {describe_value(messages)}"
        )
        return None
    if not check_messages(messages, label, problems):
        return None
    problems += check_turns(label, messages)
    if not problems and len(messages) < 2:
        problems.append(
            f"field {label}: expected at least one message (the prompt) before the final assistant message"
        )
    return None if problems else (messages[:-1], messages[-1:])


def _completion(fields: Fields, source: str, chat_template: bool | None) -> tuple[CompletionExample | None, list[str]]:
    problems: list[str] = []
    if fields.has("completion"):
        prompt = read_content(fields, "prompt", problems)
        completion = read_content(fields, "completion", problems)
        if problems:
            return None, problems
        items = _labelled(fields, ("prompt", "completion"), (prompt, completion))
        problems = mixed_formats(items, ["prompt", "completion"]) or chat_disallowed(items, chat_template)
        if not problems and isinstance(completion, list):
            problems = check_turns(fields.label("completion"), completion)
    elif fields.has("messages"):
        split = _from_messages(fields, problems)
        if split:
            prompt, completion = split
            problems = chat_disallowed([(fields.label("messages"), prompt)], chat_template)
    else:
        problems = [
            f"missing fields: expected {fields.label('prompt')} and {fields.label('completion')}, or "
            f"{fields.label('messages')} (a list of messages); the row has fields {fields.present()}"
        ]
    if problems:
        return None, problems
    if chat_template and isinstance(prompt, str):
        prompt, completion = as_user(prompt), as_assistant(completion)
    return CompletionExample(source, prompt, completion), []


_VALIDATORS = {"pairs": _pair, "completions": _completion, **GROUP_VALIDATORS}


def validate_row(
    row: Any, source: str, shape: str, columns: dict[str, str], chat_template: bool | None, text_cells: bool = False,
    paths: ColumnPaths | None = None,
) -> tuple[Example | None, list[str]]:
    """The example a row describes, or None and every problem found in it (source not included).
    ``text_cells``: the row comes from CSV (see ``Fields``); ``paths``: ``columns`` parsed once for many rows."""
    if not isinstance(row, dict):
        return None, [f"expected an object with fields {SHAPE_FIELDS[shape]}, got {describe_value(row)}"]
    return _VALIDATORS[shape](Fields(row, columns, text_cells, paths), source, chat_template)
