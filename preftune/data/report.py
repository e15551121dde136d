"""Reporting invalid rows: one error listing every problem (up to a limit), or a skip report to fix them from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fields import DataValidationError


@dataclass(frozen=True)
class RowProblem:
    source: str
    problems: tuple[str, ...]
    row: Any  # the row as read (the raw text for a line that is not JSON), written to the skip report


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
