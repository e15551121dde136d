"""Data: read and validate rows (file:line errors), tokenize with an exact boundary, collate into batches."""

from .collate import Collator, PairCollator, batches, row_layout
from .examples import (
    CompletionExample,
    NegativeExample,
    NegativesWithSamplesExample,
    PairExample,
    RankedExample,
    ScoredExample,
    UnpairedExample,
)
from .fields import DataValidationError
from .load import DataSplits, load_examples
from .prepare import TokenizedSplits, read_splits, tokenize_splits
from .ranked import RankedPairsSummary, pair_positions, ranked_to_pairs
from .readers import read_rows
from .shapes import SHAPES, detect_shape
from .tokenize import tokenize_examples
from .tokenized import TokenizedExample, content_hash
from .truncation import TruncationSummary

__all__ = [
    "SHAPES",
    "Collator",
    "CompletionExample",
    "DataSplits",
    "DataValidationError",
    "NegativeExample",
    "NegativesWithSamplesExample",
    "PairCollator",
    "PairExample",
    "RankedExample",
    "RankedPairsSummary",
    "ScoredExample",
    "TokenizedExample",
    "TokenizedSplits",
    "TruncationSummary",
    "UnpairedExample",
    "batches",
    "content_hash",
    "detect_shape",
    "load_examples",
    "pair_positions",
    "ranked_to_pairs",
    "read_rows",
    "read_splits",
    "row_layout",
    "tokenize_examples",
    "tokenize_splits",
]
