"""Reading data files into validated examples, every row tagged with where it came from.

A row keeps its source (``train.jsonl:17``) from the moment it is read, so a problem found later points
at the file line. Formats: JSONL, JSON (a list of objects), Parquet, CSV and folders written by
``datasets.Dataset.save_to_disk``; the format is chosen by extension (a folder is a saved dataset).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .validate import (
    DataValidationError,
    RowProblem,
    check_columns,
    describe_value,
    format_problems,
    invalid_rows_error,
    validate_row,
    write_skip_report,
)

logger = logging.getLogger("preftune")
SUPPORTED = ".jsonl, .json (a list of objects), .parquet, .csv, or a folder written by datasets' save_to_disk"
SHAPES = ("pairs", "completions")


@dataclass(frozen=True)
class SourcedRow:
    source: str  # "train.jsonl:17" (1-based line), "train.json:item 3", "train.csv:5", "x.parquet:row 12"
    value: Any  # the parsed row; the raw line text when it could not be parsed
    problem: str | None = None  # a problem found while reading (a line that is not JSON)


@dataclass
class DataSplits:
    train: list  # list[PairExample] or list[CompletionExample]
    eval: list  # may be empty
    skipped: int  # rows skipped under on_invalid="skip"
    report_path: Path | None


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError as exc:
        raise DataValidationError(f"{path}: not UTF-8 text ({exc})") from exc


def _jsonl_rows(name: str, text: str) -> list[SourcedRow]:
    rows = []
    # split on "\n" only: str.splitlines() would also split on U+2028 etc., which JSON strings may hold raw
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(SourcedRow(f"{name}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
            rows.append(SourcedRow(f"{name}:{lineno}", line.rstrip("\r"), problem))
    return rows


def _read_jsonl(path: Path) -> list[SourcedRow]:
    return _jsonl_rows(path.name, _read_text(path))


def _read_json(path: Path) -> list[SourcedRow]:
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: a JSONL file named .json
            return _jsonl_rows(path.name, text)
        raise DataValidationError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if isinstance(items, dict) and len(items) == 1 and isinstance(items.get("data", items.get("rows")), list):
        items = next(iter(items.values()))
    if not isinstance(items, list):
        raise DataValidationError(
            f"{path}: expected a list of objects at the top level (or {{\"data\": [...]}}), got {describe_value(items)}"
        )
    return [SourcedRow(f"{path.name}:item {i}", item) for i, item in enumerate(items)]


def _read_csv(path: Path) -> list[SourcedRow]:
    # the default 128 KiB field limit rejects long completions; the limit is process-wide in the csv module
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))  # newline="": keep quoted line breaks
    header, rows, next_line = None, [], 1
    try:
        for record in reader:
            # a quoted field may span lines: a record starts on the line after the previous record ended
            start, next_line = next_line, reader.line_num + 1
            if not record:
                continue
            if header is None:
                header = record
            elif len(record) != len(header):
                problem = f"has {len(record)} fields but the header (line 1) has {len(header)}; check the quoting"
                rows.append(SourcedRow(f"{path.name}:{start}", record, problem))
            else:
                rows.append(SourcedRow(f"{path.name}:{start}", dict(zip(header, record, strict=True))))
    except csv.Error as exc:
        raise DataValidationError(f"{path}:{reader.line_num}: not valid CSV: {exc}") from exc
    return rows


def _read_parquet(path: Path) -> list[SourcedRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged or foreign file
        raise DataValidationError(f"{path}: not a readable Parquet file: {exc}") from exc
    return [SourcedRow(f"{path.name}:row {i}", row) for i, row in enumerate(table.to_pylist())]


def _pick_split(path: Path, splits: list[str], role: str) -> str:
    wanted = ("train",) if role == "train" else ("test", "validation", "eval")
    for split in wanted:
        if split in splits:
            return split
    raise DataValidationError(
        f"{path}: a DatasetDict without a {' / '.join(repr(s) for s in wanted)} split; its splits are "
        f"{', '.join(repr(s) for s in splits)}; point data.{role}_file at one of: "
        + ", ".join(str(path / s) for s in splits)
    )


def _read_saved_dataset(path: Path, role: str) -> list[SourcedRow]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataValidationError(f"{path}: a folder, but not one written by save_to_disk ({exc}); supported: {SUPPORTED}") from exc
    name = path.name
    if isinstance(dataset, datasets.DatasetDict):
        split = _pick_split(path, list(dataset), role)
        dataset, name = dataset[split], f"{path.name}/{split}"
    return [SourcedRow(f"{name}:row {i}", row) for i, row in enumerate(dataset.to_list())]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_rows(path: str | Path, role: str = "train") -> list[SourcedRow]:
    """Every row of a data file with its source; ``role`` ("train"/"eval") picks a DatasetDict's split."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataValidationError(f"{path}: no such file or folder (supported data: {SUPPORTED})")
    if path.is_dir():
        rows = _read_saved_dataset(path, role)
    elif path.suffix.lower() in _READERS:
        rows = _READERS[path.suffix.lower()](path)
    else:
        raise DataValidationError(f"{path}: unsupported file type {path.suffix!r} (supported data: {SUPPORTED})")
    if not rows:
        raise DataValidationError(f"{path}: the file is empty: it has no rows")
    return rows


def _validate_file(path: str, role: str, shape: str, data: DataConfig) -> tuple[list, list[RowProblem], int]:
    rows = read_rows(path, role)
    examples, bad = [], []
    for row in rows:
        if row.problem is not None:
            bad.append(RowProblem(row.source, (row.problem,), row.value))
            continue
        example, problems = validate_row(row.value, row.source, shape, data.columns, data.chat_template)
        if problems:
            bad.append(RowProblem(row.source, tuple(problems), row.value))
        else:
            examples.append(example)
    return examples, bad, len(rows)


def _report_skipped(bad: list[RowProblem], report_dir: Path | None, limit: int) -> Path | None:
    if not bad:
        return None
    if report_dir is None:  # nowhere to write: put the problems in the log instead
        lines = [f"{row.source}: {problem}" for row in bad for problem in row.problems]
        logger.warning(format_problems(f"skipped {len(bad)} invalid rows (data.on_invalid=skip):", lines, limit))
        return None
    path = Path(report_dir) / "skipped_rows.jsonl"
    write_skip_report(path, bad)
    logger.warning("skipped %d invalid rows (data.on_invalid=skip); they and their problems are in %s", len(bad), path)
    return path


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` (at least one example, never all) chosen by ``seed``; both keep file order."""
    if len(examples) < 2:
        raise DataValidationError(
            f"data.eval_fraction={fraction} needs at least 2 valid rows (one to train on, one to hold out), "
            f"got {len(examples)}"
        )
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [e for i, e in enumerate(examples) if i in held_out]


def load_examples(data: DataConfig, shape: str, seed: int = 0, report_dir: Path | None = None) -> DataSplits:
    """Read and validate ``data.train_file`` (and ``data.eval_file`` or an ``eval_fraction`` split).

    ``shape`` is "pairs" (prompt/chosen/rejected) or "completions" (prompt/completion or messages). Under
    ``on_invalid="error"`` every problem in every file is raised at once; under "skip" bad rows are left
    out, counted and written to ``report_dir/skipped_rows.jsonl``. No tokenizer is needed.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if not data.train_file:
        raise DataValidationError(f"data.train_file is not set (supported data: {SUPPORTED})")
    check_columns(data.columns)
    files = [(data.train_file, "train")] + ([(data.eval_file, "eval")] if data.eval_file else [])
    results = [(path, *_validate_file(path, role, shape, data)) for path, role in files]
    bad = [problem for _, _, file_bad, _ in results for problem in file_bad]
    if bad and data.on_invalid == "error":
        raise invalid_rows_error(bad, sum(total for *_, total in results), data.max_errors_reported)
    report_path = _report_skipped(bad, report_dir, data.max_errors_reported)
    for path, examples, file_bad, _ in results:
        if not examples:
            where = f"; see {report_path}" if report_path else ""
            raise DataValidationError(f"{path}: no valid rows ({len(file_bad)} invalid rows skipped{where})")
    train = results[0][1]
    evaluation = results[1][1] if data.eval_file else []
    if not data.eval_file and data.eval_fraction > 0:
        train, evaluation = split_eval(train, data.eval_fraction, seed)
    return DataSplits(train=train, eval=evaluation, skipped=len(bad), report_path=report_path)
