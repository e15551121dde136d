"""Which data shape a file holds, and the error when the objective does not take it.

A file's shape is read from its rows' columns (after ``data.columns``), so a user who points a pair
objective at KTO data hears that, in those words, before anything is tokenized.
"""

from __future__ import annotations

from .fields import DataValidationError, Fields
from .readers import SourcedRow
from .validate import CANONICAL_FIELDS, SHAPE_FIELDS

SHAPES = tuple(SHAPE_FIELDS)
# Columns that only one shape has. A row with prompt, completion and label is unpaired data, not single
# completions with an extra column: the label must not be dropped silently.
_DISTINCT = (
    ("completions", "ranked"), ("samples", "negatives_with_samples"), ("chosen", "pairs"), ("label", "unpaired"),
    ("score", "scored"),
)
# Columns that the shapes above share with simpler ones: they decide only when no distinct column is there.
_FALLBACK = (("rejected", "negatives"), ("completion", "completions"), ("messages", "completions"))
_DATA_NAMES = {"pairs": "preference pairs", "completions": "single completions", "ranked": "ranked lists",
               "negatives_with_samples": "negatives with model samples"}
_MAX_OBJECTIVES_NAMED = 8


def detect_shape(fields: Fields, accepted: tuple[str, ...] = ()) -> str | None:
    """The shape a row's columns describe, or None when no shape's columns are there. A row with the
    distinct columns of several shapes (pairs that also carry a ranked list) is read as an accepted one."""
    found = [shape for column, shape in _DISTINCT if fields.has(column)]
    if found:
        return next((shape for shape in found if shape in accepted), found[0])
    return next((shape for column, shape in _FALLBACK if fields.has(column)), None)


def _row_fields(row: SourcedRow, columns: dict[str, str]) -> Fields | None:
    if row.problem is not None or not isinstance(row.value, dict):
        return None
    return Fields(row.value, columns, row.text_cells)


def file_shape(
    rows: list[SourcedRow], columns: dict[str, str], accepted: tuple[str, ...] = ()
) -> tuple[str | None, Fields | None]:
    """(shape, fields of its first row): the shape most rows' columns describe (the earliest on a tie), so
    that one broken row at the top of a file does not pass for another shape; (None, None) when no row's
    columns describe any shape."""
    votes: dict[str, int] = {}
    first: dict[str, Fields] = {}
    for row in rows:
        fields = _row_fields(row, columns)
        shape = detect_shape(fields, accepted) if fields else None
        if shape is not None:
            votes[shape] = votes.get(shape, 0) + 1
            first.setdefault(shape, fields)
    if not votes:
        return None, None
    shape = max(votes, key=votes.get)  # max() keeps the first of equal counts: dicts keep insertion order
    return shape, first[shape]


def _objectives_taking(shape: str) -> list[str]:
    from ..objectives import table  # lazy: the data package does not otherwise depend on objectives

    return sorted(name for name, objective in table.OBJECTIVES.items() if shape in objective.shapes)


def _named_objectives(shape: str) -> str:
    names = _objectives_taking(shape)
    shown = ", ".join(names[:_MAX_OBJECTIVES_NAMED])
    if len(names) > _MAX_OBJECTIVES_NAMED:
        shown += f" and {len(names) - _MAX_OBJECTIVES_NAMED} more"
    if shape == "ranked":
        shown = (shown + "; " if shown else "") + "or any objective on pairs, with data.ranked_to_pairs"
    return f"objectives: {shown}" if shown else "no objective in the table takes it"


def _taken(accepted: tuple[str, ...]) -> str:
    parts = [f"{shape} ({SHAPE_FIELDS[shape]})" for shape in accepted]
    text = " or ".join(parts)
    if "pairs" in accepted and "ranked" not in accepted:
        text += " [or ranked lists with data.ranked_to_pairs]"
    return text


def _present(fields: Fields) -> str:
    """The canonical fields the row has, named as in the file when ``data.columns`` maps them."""
    names = []
    for name in CANONICAL_FIELDS:
        if fields.has(name):
            column = fields.column(name)
            names.append(name if column == name else f"{name} (column '{column}')")
    return ", ".join(names)


def mismatch_error(path: str, shape: str, fields: Fields, accepted: tuple[str, ...], objective: str | None):
    """e.g. "train.jsonl: objective 'dpo' takes pairs (prompt, chosen, rejected) [or ranked lists with
    data.ranked_to_pairs]; the rows have prompt, completion, label, which is unpaired data (objectives: kto)"."""
    who = f"objective {objective!r}" if objective else "the objective"
    message = (
        f"{path}: {who} takes {_taken(accepted)}; the rows have {_present(fields)}, which is "
        f"{_DATA_NAMES.get(shape, shape + ' data')} ({_named_objectives(shape)})"
    )
    if shape == "ranked" and "pairs" in accepted:
        message += (
            "; to train on pairs drawn from each list, set data.ranked_to_pairs to all_pairs, best_vs_worst or "
            "best_vs_each"
        )
    return DataValidationError(message)
