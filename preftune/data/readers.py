"""Reading data files into rows, every row tagged with where it came from.

A row keeps its source (``train.jsonl:17``) from the moment it is read, so a problem found later points
at the file line. Formats: JSONL, JSON (a list of objects), Parquet, CSV, and what ``datasets`` reads
(``datasets_source``: hub names, ``save_to_disk`` folders, folders of data files); a file's format is chosen
by its extension.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .datasets_source import DatasetRequest, is_hub_name, open_dataset
from .fields import DataValidationError, describe_value

SUPPORTED = (".jsonl, .json (a list of objects), .parquet, .csv, a folder written by datasets' save_to_disk or of "
             "data files, or a Hugging Face hub dataset name (owner/name)")


@dataclass(frozen=True)
class SourcedRow:
    source: str  # "train.jsonl:17" (1-based line), "train.json:item 3", "train.csv:5", "x.parquet:row 12"
    value: Any  # the parsed row; the raw line text when it could not be parsed
    problem: str | None = None  # a problem found while reading (a line that is not JSON)
    text_cells: bool = False  # CSV: every value is text, so labels, numbers and lists are JSON in the cell


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataValidationError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column} cannot be decoded); "
            "save the file as UTF-8"
        ) from exc


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
                rows.append(SourcedRow(f"{path.name}:{start}", record, problem, text_cells=True))
            else:
                rows.append(SourcedRow(f"{path.name}:{start}", dict(zip(header, record, strict=True)), text_cells=True))
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


def dataset_rows(dataset, label: str) -> list[SourcedRow]:
    return [SourcedRow(f"{label}:row {i}", row) for i, row in enumerate(dataset.to_list())]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_rows(path: str | Path, role: str = "train", split: str | None = None, subset: str | None = None,
              data_dir: str | None = None, key: str = "data.train_file") -> list[SourcedRow]:
    """Every row of a data file, dataset folder or hub dataset, with its source. ``split`` (any name) picks a
    dataset's split; without it ``role`` ("train"/"eval") picks train, or test/validation/eval."""
    location = str(path)
    path = Path(location).expanduser()
    if path.is_dir() or (not path.exists() and is_hub_name(location)):
        dataset, label = open_dataset(DatasetRequest(location, key, role, split, subset, data_dir))
        rows = dataset_rows(dataset, label)
    else:
        check_single_file(path, split, subset, data_dir)
        rows = _READERS[path.suffix.lower()](path)
    if not rows:
        raise DataValidationError(f"{path}: the file is empty: it has no rows")
    return rows


def check_single_file(path: Path, split: str | None, subset: str | None, data_dir: str | None) -> None:
    """A file exists, has a supported type, and is not asked for what only datasets have."""
    if not path.exists():
        where = "" if path.is_absolute() else f"; looked for {path.absolute()} (a recipe's relative paths are tried " \
                                              "in the working directory, then beside the recipe)"
        raise DataValidationError(f"{path}: no such file or folder{where} (supported data: {SUPPORTED})")
    if path.suffix.lower() not in _READERS:
        raise DataValidationError(f"{path}: unsupported file type {path.suffix!r} (supported data: {SUPPORTED})")
    asked = [name for name, value in (("split", split), ("subset", subset), ("data_dir", data_dir)) if value]
    if asked:
        raise DataValidationError(f"{path}: a single file has no {' / '.join(asked)}; data.split, data.eval_split, "
                                  "data.subset and data.data_dir apply to hub datasets and dataset folders")
