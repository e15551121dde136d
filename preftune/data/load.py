"""Data files -> validated examples of the shape the objective takes, split into train and held-out.

The file's shape is detected from its rows (``shapes.file_shape``) and checked against the shapes the
objective accepts; ranked lists become pairs when ``data.ranked_to_pairs`` asks for it.
"""

from __future__ import annotations

import logging
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..user_code import load_function
from .columns import ColumnPaths
from .examples import Example
from .fields import DataValidationError
from .ranked import ranked_to_pairs
from .readers import SUPPORTED, SourcedRow, read_rows
from .report import RowProblem, format_problems, invalid_rows_error, write_skip_report
from .shapes import SHAPES, file_shape, mismatch_error
from .streaming import LazyExamples, MappedRows, open_rows
from .validate import check_columns, validate_row

logger = logging.getLogger("preftune")


@dataclass
class DataSplits:
    train: list[Example]
    eval: list[Example]  # may be empty
    skipped: int  # rows skipped under on_invalid="skip"
    report_path: Path | None
    shape: str = "pairs"  # the shape of the examples above ("pairs" for ranked lists turned into pairs)
    summaries: list[str] = field(default_factory=list)  # conversions done (ranked lists -> pairs), as logged


def _validate_rows(rows, shape: str, data: DataConfig):
    """(examples, problems): a list of examples, or with ``data.streaming`` the positions of the valid rows
    (``LazyExamples``), which are validated again when read."""
    examples, positions, bad = [], array("q"), []
    paths = ColumnPaths(data.columns)
    for position, row in enumerate(rows):
        if row.problem is not None:
            bad.append(RowProblem(row.source, (row.problem,), row.value))
            continue
        example, problems = validate_row(row.value, row.source, shape, data.columns, data.chat_template,
                                         row.text_cells, paths)
        if problems:
            bad.append(RowProblem(row.source, tuple(problems), row.value))
        elif data.streaming:
            positions.append(position)
        else:
            examples.append(example)
    if data.streaming:
        return LazyExamples(rows, positions, shape, data.columns, data.chat_template), bad
    return examples, bad


def _open_rows(location: str, role: str, split: str | None, data: DataConfig):
    """Rows of one file or dataset (held in memory, or read on demand with ``data.streaming``), each passed
    through ``data.row_mapper`` when one is set."""
    key = "data.train_file" if role == "train" else "data.eval_file"
    if data.streaming:
        rows = open_rows(location, role, split, data.subset, data.data_dir, key)
    else:
        rows = read_rows(location, role, split, data.subset, data.data_dir, key)
    if data.row_mapper:
        mapped = MappedRows(rows, load_function(data.row_mapper, "data.row_mapper"))
        rows = mapped if data.streaming else list(mapped)
    return rows


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


def split_eval(examples, fraction: float, seed: int) -> tuple:
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
    del order
    train = [i for i in range(len(examples)) if i not in held_out]
    return _take(examples, train), _take(examples, sorted(held_out))


def _take(examples, indices: list[int]):
    return examples.take(indices) if isinstance(examples, LazyExamples) else [examples[i] for i in indices]


def _accepted_shapes(shape: str | tuple[str, ...]) -> tuple[str, ...]:
    accepted = (shape,) if isinstance(shape, str) else tuple(shape)
    unknown = [s for s in accepted if s not in SHAPES]
    if unknown or not accepted:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)} (or a tuple of them), got {shape!r}")
    return accepted


def _choose_shape(files: list[tuple[str, list[SourcedRow]]], accepted: tuple[str, ...], data: DataConfig,
                  objective: str | None) -> tuple[str, str]:
    """(shape to validate the files as, shape of the examples returned); a file that holds another shape
    than the objective takes, or than the train file holds, is an error naming both."""
    train_path, train_rows = files[0]
    found, fields = file_shape(train_rows, data.columns, accepted)
    if found is None:  # no row has any shape's columns: validate as the first accepted shape, errors per line
        found = accepted[0]
    converts = found == "ranked" and "pairs" in accepted and data.ranked_to_pairs is not None
    if not converts and found not in accepted:
        raise mismatch_error(train_path, found, fields, accepted, objective)
    for path, rows in files[1:]:
        other, _ = file_shape(rows, data.columns, accepted)
        if other is not None and other != found:
            raise DataValidationError(f"{path}: the rows are {other} data but {train_path} holds {found} data; "
                                      "the train and held-out files must have the same shape")
    if data.ranked_to_pairs and found != "ranked":
        logger.warning("data.ranked_to_pairs=%s is ignored: %s holds %s data, not ranked lists",
                       data.ranked_to_pairs, train_path, found)
    return found, "pairs" if converts else found


def _to_pairs(examples: list, split: str, path: str, mode: str) -> tuple[list, str]:
    pairs, summary = ranked_to_pairs(examples, mode)
    line = f"{split}: {summary.describe()}"
    (logger.warning if summary.without_pairs else logger.info)("%s", line)
    if examples and not pairs:
        raise DataValidationError(f"{path}: data.ranked_to_pairs={mode} gave no pairs: every list's scores are tied")
    return pairs, line


def _check_one_format(examples: list[Example], data: DataConfig) -> None:
    """Text rows and conversations in one dataset would train on two prompt formats (only conversations go
    through the chat template): an error naming the first row of the other kind and the two ways out."""
    if data.chat_template is not None or not examples:  # true: every row is rendered as a conversation
        return
    first = examples[0]
    chat = isinstance(first.prompt, list)
    other = next((e for e in examples if isinstance(e.prompt, list) != chat), None)
    if other is not None:
        kinds = ("conversation (messages)", "text") if chat else ("text", "conversation (messages)")
        raise DataValidationError(
            f"{other.source}: a {kinds[1]} row, but the first row ({first.source}) is a {kinds[0]}: conversations "
            "are rendered with the chat template and text rows are not, so the model would train on two prompt "
            "formats; give every row the same form, or set data.chat_template: true to render text rows as "
            "conversations too")


def load_examples(data: DataConfig, shape: str | tuple[str, ...], seed: int = 0, report_dir: Path | None = None,
                  objective: str | None = None) -> DataSplits:
    """Read and validate ``data.train_file`` (and ``data.eval_file`` or an ``eval_fraction`` split).

    ``shape`` is the shape, or tuple of shapes, the objective takes (its ``shapes`` trait): "pairs",
    "completions", "unpaired", "scored", "negatives", "negatives_with_samples", "ranked". The file's own
    shape is the one most of its rows' columns describe and must be one of them, or be ranked lists while the
    objective takes pairs and ``data.ranked_to_pairs`` is set; ``objective`` names the objective in that
    error. Under ``on_invalid="error"`` every problem in every file is raised at once; under "skip" bad rows
    are left out, counted and written to ``report_dir/skipped_rows.jsonl``. No tokenizer is needed.
    """
    accepted = _accepted_shapes(shape)
    if not data.train_file:
        raise DataValidationError(f"data.train_file is not set (supported data: {SUPPORTED})")
    check_columns(data.columns)
    sources = [(data.train_file, "train", data.split)]
    if data.eval_file or data.eval_split:  # a held-out split of the train dataset needs no eval_file
        sources.append((data.eval_file or data.train_file, "eval", data.eval_split))
    files = [(path, _open_rows(path, role, split, data)) for path, role, split in sources]
    found, returned = _choose_shape(files, accepted, data, objective)
    results = [(path, *_validate_rows(rows, found, data), len(rows)) for path, rows in files]
    bad = [problem for _, _, file_bad, _ in results for problem in file_bad]
    if bad and data.on_invalid == "error":
        raise invalid_rows_error(bad, sum(total for *_, total in results), data.max_errors_reported)
    report_path = _report_skipped(bad, report_dir, data.max_errors_reported)
    for path, examples, file_bad, _ in results:
        if not examples:
            where = f"; see {report_path}" if report_path else ""
            raise DataValidationError(f"{path}: no valid rows ({len(file_bad)} invalid rows skipped{where})")
    _check_one_format([e for _, examples, _, _ in results for e in examples], data)
    train = results[0][1]
    evaluation = results[1][1] if len(results) > 1 else []
    if len(results) == 1 and data.eval_fraction > 0:
        train, evaluation = split_eval(train, data.eval_fraction, seed)  # before pairing: no list on both sides
    summaries = []
    if returned != found:
        eval_path = data.eval_file or data.train_file
        train, line = _to_pairs(train, "train", data.train_file, data.ranked_to_pairs)
        summaries.append(line)
        if evaluation:
            evaluation, line = _to_pairs(evaluation, "eval", eval_path, data.ranked_to_pairs)
            summaries.append(line)
    return DataSplits(train, evaluation, len(bad), report_path, returned, summaries)
