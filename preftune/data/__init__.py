"""Data: read and validate rows (file:line errors), tokenize with an exact boundary, collate into batches."""

from .collate import PairCollator
from .load import DataSplits, load_examples, read_rows
from .tokenize import TokenizedExample, TruncationSummary, content_hash, tokenize_examples
from .validate import CompletionExample, DataValidationError, PairExample

__all__ = [
    "CompletionExample",
    "DataSplits",
    "DataValidationError",
    "PairCollator",
    "PairExample",
    "TokenizedExample",
    "TruncationSummary",
    "content_hash",
    "load_examples",
    "read_rows",
    "tokenize_examples",
]
