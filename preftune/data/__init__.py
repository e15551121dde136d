"""Data: read and validate rows (file:line errors), tokenize with an exact boundary, collate into batches."""

from .collate import Collator, PairCollator
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
    "TruncationSummary",
    "UnpairedExample",
    "content_hash",
    "detect_shape",
    "load_examples",
    "pair_positions",
    "ranked_to_pairs",
    "read_rows",
    "tokenize_examples",
]
