"""Validated examples, one type per data shape, each listing its completions in slot order.

``slots`` is the order tokenization and collation use (pairs ``[chosen, rejected]``, ranked ``[best, ...,
worst]``, ...), so the code after validation never needs to know a shape's field names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

Content = str | list[dict]  # text, or a list of {role, content} messages


@dataclass(frozen=True)
class PairExample:
    shape: ClassVar[str] = "pairs"
    source: str  # "train.jsonl:17", "train.json:item 3", "train.csv:5", "train.parquet:row 12"
    prompt: Content
    chosen: Content  # text, or the assistant message(s) that follow the prompt
    rejected: Content

    @property
    def slots(self) -> list[Content]:
        return [self.chosen, self.rejected]


@dataclass(frozen=True)
class CompletionExample:
    shape: ClassVar[str] = "completions"
    source: str
    prompt: Content
    completion: Content

    @property
    def slots(self) -> list[Content]:
        return [self.completion]


@dataclass(frozen=True)
class UnpairedExample:
    """KTO data: one completion rated desirable (``label`` True) or undesirable."""

    shape: ClassVar[str] = "unpaired"
    source: str
    prompt: Content
    completion: Content
    label: bool

    @property
    def slots(self) -> list[Content]:
        return [self.completion]


@dataclass(frozen=True)
class ScoredExample:
    """DRO data: one completion with a scalar score (higher = better)."""

    shape: ClassVar[str] = "scored"
    source: str
    prompt: Content
    completion: Content
    score: float

    @property
    def slots(self) -> list[Content]:
        return [self.completion]


@dataclass(frozen=True)
class NegativeExample:
    """NPO data: a completion the model should stop producing."""

    shape: ClassVar[str] = "negatives"
    source: str
    prompt: Content
    rejected: Content

    @property
    def slots(self) -> list[Content]:
        return [self.rejected]


@dataclass(frozen=True)
class NegativesWithSamplesExample:
    """D²O data: a human negative plus K samples drawn from the starting model."""

    shape: ClassVar[str] = "negatives_with_samples"
    source: str
    prompt: Content
    rejected: Content
    samples: list[Content]

    @property
    def slots(self) -> list[Content]:
        return [self.rejected, *self.samples]


@dataclass(frozen=True)
class RankedExample:
    """A ranked list as the file gives it: ``completions`` and their ``scores`` in file order (ranks were
    turned into scores = -rank). ``order`` is best first; ties keep file order so the result is stable."""

    shape: ClassVar[str] = "ranked"
    source: str
    prompt: Content
    completions: list[Content]
    scores: list[float]

    @property
    def order(self) -> list[int]:
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])  # sorted() is stable

    @property
    def slots(self) -> list[Content]:
        return [self.completions[i] for i in self.order]

    @property
    def ranked_scores(self) -> list[float]:
        return [self.scores[i] for i in self.order]


Example = (PairExample | CompletionExample | UnpairedExample | ScoredExample | NegativeExample
           | NegativesWithSamplesExample | RankedExample)


def slot_scores(example: Example) -> list[float] | None:
    """Scores in slot order: ``[score]`` for scored data, best first for ranked lists, else None."""
    if isinstance(example, ScoredExample):
        return [example.score]
    if isinstance(example, RankedExample):
        return example.ranked_scores
    return None


def slot_label(example: Example) -> bool | None:
    return example.label if isinstance(example, UnpairedExample) else None
