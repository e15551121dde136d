"""Row checks for the shapes that are not a pair: unpaired (KTO), scored (DRO), negatives (NPO), negatives
with model samples (D²O) and ranked lists (Plackett-Luce, or pairs through ``data.ranked_to_pairs``).

Problems read like the pairs' ones (``field 'label': expected ..., got ...``); items of a list field are
numbered from 1, as messages are (``field 'completions' item 2: ...``).
"""

from __future__ import annotations

from typing import Any

from .examples import (
    Content,
    NegativeExample,
    NegativesWithSamplesExample,
    RankedExample,
    ScoredExample,
    UnpairedExample,
)
from .fields import (
    CONTENT,
    Fields,
    as_assistant,
    as_user,
    chat_disallowed,
    check_turns,
    content_value,
    describe_value,
    is_number,
    missing,
    mixed_formats,
    read_content,
)

LABEL = "true or false (JSON booleans) or 1 or 0, where true = desirable"
SCORE = "a finite number"


def _prompted(
    fields: Fields, prompt: Content, items: list[tuple[str, Content]], together: list[str], chat_template: bool | None
) -> tuple[Content, list[Content]] | list[str]:
    """(prompt, completions) in one format, as the pairs are: no text mixed with messages, message lists that
    repeat the prompt are cut after it, conversations end with the assistant, text is wrapped for the chat
    template when it is asked for. A list of problems otherwise."""
    labelled = [(fields.label("prompt"), prompt), *items]
    problems = mixed_formats(labelled, together) or chat_disallowed(labelled, chat_template)
    if problems:
        return problems
    completions = [value for _, value in items]
    if isinstance(prompt, list):
        if all(len(c) > len(prompt) and c[: len(prompt)] == prompt for c in completions):
            completions = [c[len(prompt) :] for c in completions]
        problems = [p for (label, _), c in zip(items, completions, strict=True) for p in check_turns(label, c)]
        return problems or (prompt, completions)
    if chat_template:
        return as_user(prompt), [as_assistant(c) for c in completions]
    return prompt, completions


def _read_label(fields: Fields, problems: list[str]) -> bool | None:
    if not fields.has("label"):
        problems.append(missing(fields, "label", LABEL))
        return None
    value = fields.typed("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    problems.append(f"field {fields.label('label')}: expected {LABEL}, got {describe_value(value)}{fields.cell_hint()}")
    return None


def _read_score(fields: Fields, problems: list[str]) -> float | None:
    if not fields.has("score"):
        problems.append(missing(fields, "score", SCORE))
        return None
    value = fields.typed("score")
    if is_number(value):
        return float(value)
    problems.append(f"field {fields.label('score')}: expected {SCORE}, got {describe_value(value)}{fields.cell_hint()}")
    return None


def _single(fields: Fields, chat_template: bool | None, name: str, problems: list[str]):
    """(prompt, [completion]) of a row with one completion in field ``name``, or None (problems noted)."""
    own: list[str] = []  # problems found so far elsewhere in the row must not stop these checks
    prompt = read_content(fields, "prompt", own)
    completion = read_content(fields, name, own)
    result = None
    if not own:
        result = _prompted(fields, prompt, [(fields.label(name), completion)], ["prompt", name], chat_template)
        if isinstance(result, list):
            own, result = result, None
    problems += own
    return result


def _unpaired(fields: Fields, source: str, chat_template: bool | None):
    problems: list[str] = []
    label = _read_label(fields, problems)
    result = _single(fields, chat_template, "completion", problems)
    if problems:
        return None, problems
    return UnpairedExample(source, result[0], result[1][0], label), []


def _scored(fields: Fields, source: str, chat_template: bool | None):
    problems: list[str] = []
    score = _read_score(fields, problems)
    result = _single(fields, chat_template, "completion", problems)
    if problems:
        return None, problems
    return ScoredExample(source, result[0], result[1][0], score), []


def _negative(fields: Fields, source: str, chat_template: bool | None):
    problems: list[str] = []
    result = _single(fields, chat_template, "rejected", problems)
    if problems:
        return None, problems
    return NegativeExample(source, result[0], result[1][0]), []


def _read_items(fields: Fields, name: str, minimum: int, what: str, problems: list[str]) -> list[tuple[str, Any]] | None:
    """(label, content) for every item of the list field ``name``, or None (problems noted)."""
    expected = f"a list of at least {minimum} {what}, each {CONTENT}"
    if not fields.has(name):
        problems.append(missing(fields, name, expected))
        return None
    value, label = fields.typed(name), fields.label(name)
    if not isinstance(value, list) or len(value) < minimum:
        count = f" of {len(value)}" if isinstance(value, list) else ""
        shown = describe_value(value).replace("a list", f"a list{count}", 1)
        problems.append(f"field {label}: expected {expected}, got {shown}{fields.cell_hint()}")
        return None
    start = len(problems)
    items = [(f"{label} item {i}", content_value(item, f"{label} item {i}", problems)) for i, item in enumerate(value, 1)]
    return items if len(problems) == start else None


def _with_samples(fields: Fields, source: str, chat_template: bool | None):
    problems: list[str] = []
    prompt = read_content(fields, "prompt", problems)
    rejected = read_content(fields, "rejected", problems)
    samples = _read_items(fields, "samples", 1, "completions sampled from the starting model", problems)
    if problems:
        return None, problems
    items = [(fields.label("rejected"), rejected), *samples]
    result = _prompted(fields, prompt, items, ["prompt", "rejected", "samples"], chat_template)
    if isinstance(result, list):
        return None, result
    prompt, (rejected, *samples) = result
    return NegativesWithSamplesExample(source, prompt, rejected, samples), []


def _read_scores(fields: Fields, count: int, problems: list[str]) -> list[float] | None:
    value, label = fields.typed("scores"), fields.label("scores")
    expected = f"a list of {count} finite numbers (one per completion, higher = better)"
    if not isinstance(value, list) or len(value) != count:
        problems.append(f"field {label}: expected {expected}, got {describe_value(value)}{fields.cell_hint()}")
        return None
    bad = [f"field {label} item {i}: expected {SCORE}, got {describe_value(v)}"
           for i, v in enumerate(value, 1) if not is_number(v)]
    problems += bad
    return None if bad else [float(v) for v in value]


def _read_ranks(fields: Fields, count: int, problems: list[str]) -> list[float] | None:
    """Ranks 1..K (1 = best) become scores -rank, so that higher is better as for ``scores``."""
    value = fields.typed("ranks")
    ints = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if ints and sorted(value) == list(range(1, count + 1)):
        return [-float(v) for v in value]
    problems.append(
        f"field {fields.label('ranks')}: expected the ranks 1..{count} in some order (a permutation: one rank per "
        f"completion, 1 = best, no ties), got {describe_value(value)}{fields.cell_hint()}"
    )
    return None


def _ranking(fields: Fields, count: int | None, problems: list[str]) -> list[float] | None:
    """Scores from ``scores`` or ``ranks``; with no usable ``completions`` list (``count`` None) only whether
    exactly one of them is there is checked, since their length cannot be."""
    has_scores, has_ranks = fields.has("scores"), fields.has("ranks")
    if has_scores and has_ranks:
        problems.append(f"fields {fields.label('scores')} and {fields.label('ranks')}: give one of them, not both")
    elif count is None and (has_scores or has_ranks):
        return None
    elif has_scores:
        return _read_scores(fields, count, problems)
    elif has_ranks:
        return _read_ranks(fields, count, problems)
    else:
        problems.append(
            f"fields {fields.label('scores')} and {fields.label('ranks')}: both missing (expected one of them: "
            f"scores, one number per completion, or ranks, a permutation of 1..K); the row has fields {fields.present()}"
        )
    return None


def _duplicates(fields: Fields, completions: list[Content]) -> list[str]:
    """The same completion twice in a ranking orders a text against itself: a data bug, as in a pair."""
    for j, later in enumerate(completions):
        for i in range(j):
            if completions[i] == later:
                return [f"field {fields.label('completions')}: items {i + 1} and {j + 1} are identical; "
                        "a ranking needs different completions"]
    return []


def _ranked(fields: Fields, source: str, chat_template: bool | None):
    problems: list[str] = []
    prompt = read_content(fields, "prompt", problems)
    items = _read_items(fields, "completions", 2, "completions", problems)
    raw = fields.typed("completions")
    scores = _ranking(fields, len(raw) if isinstance(raw, list) and len(raw) >= 2 else None, problems)
    if problems:
        return None, problems
    problems = _duplicates(fields, [content for _, content in items])
    result = problems or _prompted(fields, prompt, items, ["prompt", "completions"], chat_template)
    if isinstance(result, list):
        return None, result
    return RankedExample(source, result[0], result[1], scores), []


GROUP_VALIDATORS = {
    "unpaired": _unpaired,
    "scored": _scored,
    "negatives": _negative,
    "negatives_with_samples": _with_samples,
    "ranked": _ranked,
}
