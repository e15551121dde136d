"""``data.streaming: true``: rows stay on disk and are read when an example is needed.

What is held in memory: for a JSONL file, the byte offset and line number of each non-empty line (16 bytes a
row); for Parquet, hub datasets and dataset folders, a memory-mapped Arrow table (``datasets``; a Parquet
file is converted once into the datasets cache), whose pages the OS reads in and drops as it likes; and, after
validation, the position of each valid row (8 bytes). Rows themselves, validated examples and token ids are
not held: validation reads every row once (errors name the line, as without streaming), tokenization reads
them once more to decide what truncation drops, and training reads, validates and tokenizes each example
again when its batch is built. Invalid rows (to report them) and dropped examples' sources are kept.
JSON and CSV files are read whole; convert them to JSONL to stream them.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

from ..config import DataConfig
from .columns import map_row
from .datasets_source import DatasetRequest, is_hub_name, open_dataset
from .encoder import Encoder
from .fields import DataValidationError
from .readers import SourcedRow, check_single_file
from .tokenize import check_strict, tokenize_some
from .tokenized import TokenizedExample
from .truncation import UNITS, TruncationSummary
from .validate import validate_row

_CHUNK = 256  # examples tokenized per tokenizer call while streaming: batching is faster, chunks bound memory


class JsonlRows:
    """A JSONL file as an index of line offsets; ``row(i)`` seeks to the line and parses it."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.name
        self.offsets, self.lines = array("q"), array("q")
        position = 0
        with open(path, "rb") as handle:
            for lineno, line in enumerate(handle, 1):  # binary lines split on b"\n" only, as the eager reader
                if line.strip():
                    self.offsets.append(position)
                    self.lines.append(lineno)
                position += len(line)
        self._handle = None

    def __len__(self) -> int:
        return len(self.offsets)

    def _parse(self, i: int, raw: bytes) -> SourcedRow:
        source = f"{self.name}:{self.lines[i]}"
        try:
            text = raw.decode("utf-8-sig" if self.offsets[i] == 0 else "utf-8")
        except UnicodeDecodeError as exc:
            return SourcedRow(source, raw.decode("utf-8", "replace").rstrip("\r\n"), f"not UTF-8 text ({exc})")
        try:
            return SourcedRow(source, json.loads(text))
        except json.JSONDecodeError as exc:
            return SourcedRow(source, text.rstrip("\r\n"), f"not valid JSON ({exc.msg} at column {exc.colno})")

    def row(self, i: int) -> SourcedRow:
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open for the run's random reads
        self._handle.seek(self.offsets[i])
        return self._parse(i, self._handle.readline())

    def __iter__(self) -> Iterator[SourcedRow]:
        with open(self.path, "rb") as handle:
            for i, offset in enumerate(self.offsets):
                handle.seek(offset)
                yield self._parse(i, handle.readline())


class ArrowRows:
    """A ``datasets.Dataset`` (memory-mapped Arrow): ``row(i)`` reads one row from disk."""

    def __init__(self, dataset, label: str):
        self.dataset, self.label = dataset, label

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, i: int) -> SourcedRow:
        return SourcedRow(f"{self.label}:row {i}", self.dataset[i])

    def __iter__(self) -> Iterator[SourcedRow]:
        for i, value in enumerate(self.dataset):  # datasets reads record batches one at a time
            yield SourcedRow(f"{self.label}:row {i}", value)


class MappedRows:
    """Rows passed through ``data.row_mapper`` as they are read."""

    def __init__(self, rows, mapper: Callable[[dict], dict]):
        self.rows, self.mapper = rows, mapper

    def __len__(self) -> int:
        return len(self.rows)

    def _map(self, row: SourcedRow) -> SourcedRow:
        if row.problem is not None:
            return row
        value, problem = map_row(self.mapper, row.value)
        return SourcedRow(row.source, value, problem, row.text_cells)

    def row(self, i: int) -> SourcedRow:
        return self._map(self.rows.row(i))

    def __iter__(self) -> Iterator[SourcedRow]:
        return map(self._map, self.rows)


def open_rows(location: str, role: str, split: str | None, subset: str | None, data_dir: str | None, key: str):
    """The rows of ``location`` without reading them into memory (see the module docstring)."""
    path = Path(location).expanduser()
    if path.is_dir() or (not path.exists() and is_hub_name(location)):
        return ArrowRows(*open_dataset(DatasetRequest(location, key, role, split, subset, data_dir)))
    check_single_file(path, split, subset, data_dir)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = JsonlRows(path)
    elif suffix == ".parquet":
        import datasets

        rows = ArrowRows(datasets.Dataset.from_parquet(str(path)), path.name)
    else:
        raise DataValidationError(f"{path}: data.streaming reads .jsonl, .parquet and datasets (hub names, dataset "
                                  f"folders); a {suffix} file is read whole: convert it to JSONL, or turn streaming off")
    if not len(rows):
        raise DataValidationError(f"{path}: the file is empty: it has no rows")
    return rows


class LazyExamples:
    """The valid rows of ``rows`` (their positions), validated again into an example when one is asked for."""

    def __init__(self, rows, positions: array, shape: str, columns: dict, chat_template: bool | None):
        self.rows, self.positions, self.shape = rows, positions, shape
        self.columns, self.chat_template = columns, chat_template

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        row = self.rows.row(self.positions[i])
        example, problems = validate_row(row.value, row.source, self.shape, self.columns, self.chat_template,
                                         row.text_cells)
        if example is None:  # it validated a moment ago: the file changed under the run
            raise DataValidationError(f"{row.source}: the row changed since it was validated: {'; '.join(problems)}")
        return example

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, indices: list[int]) -> LazyExamples:
        positions = array("q", (self.positions[i] for i in indices))
        return LazyExamples(self.rows, positions, self.shape, self.columns, self.chat_template)


class LazyTokenized:
    """The tokenized examples of a streamed split, tokenized again when one is asked for; ``kept`` are the
    positions (in the split) of the examples truncation keeps, which are also their ``index``."""

    def __init__(self, examples: LazyExamples, kept: array, encoder: Encoder, data: DataConfig):
        self.examples, self.kept, self.encoder, self.data = examples, kept, encoder, data

    def __len__(self) -> int:
        return len(self.kept)

    def _tokenize(self, positions: list[int]) -> list[TokenizedExample]:
        tokenized, _ = tokenize_some([self.examples[p] for p in positions], self.encoder, self.data, indices=positions)
        if len(tokenized) != len(positions):
            raise DataValidationError(f"{self.examples[positions[0]].source}: the data changed since it was tokenized")
        return tokenized

    def __getitem__(self, i: int) -> TokenizedExample:
        return self._tokenize([self.kept[i]])[0]

    def __iter__(self) -> Iterator[TokenizedExample]:
        for start in range(0, len(self.kept), _CHUNK):
            yield from self._tokenize(list(self.kept[start : start + _CHUNK]))


def tokenize_streamed(examples: LazyExamples, tokenizer, data: DataConfig) -> tuple[LazyTokenized, TruncationSummary]:
    """One pass over a streamed split, tokenizing a chunk at a time to learn what truncation drops; the
    token ids are then thrown away and recomputed when training asks for an example."""
    encoder, kept = Encoder(tokenizer), array("q")
    summary = TruncationSummary(len(examples), 0, 0, [], UNITS.get(examples.shape, "example"), data.max_prompt_length)
    for start in range(0, len(examples), _CHUNK):
        chunk = [examples[i] for i in range(start, min(start + _CHUNK, len(examples)))]
        tokenized, part = tokenize_some(chunk, encoder, data, start=start)
        kept.extend(example.index for example in tokenized)
        summary.prompts_truncated += part.prompts_truncated
        summary.completions_truncated += part.completions_truncated
        summary.dropped += part.dropped
        del chunk, tokenized  # before the next chunk is built: one chunk in memory at a time, not two
    check_strict(summary, data)
    return LazyTokenized(examples, kept, encoder, data), summary
