"""A run's data, end to end: every row read and validated before anything heavy happens, then both splits
tokenized (or, with ``data.streaming``, read and tokenized again when a batch needs them), with one log line
per conversion and truncation summary."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_jsonl
from ..config import Config
from .load import DataSplits, load_examples
from .streaming import LazyExamples, tokenize_streamed
from .tokenize import tokenize_examples
from .tokenized import TokenizedExample

log = logging.getLogger("preftune")


@dataclass
class TokenizedSplits:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    summaries: list[str]


def read_splits(config: Config, objective, run_dir: Path | None, shapes: tuple[str, ...] | None = None) -> DataSplits:
    """Load and validate every row (fails fast on bad data, before any model loads). The file's shape must be
    one the objective (an ``ObjectivePlan``) trains on; ``shapes`` narrows that, e.g. for `preftune eval`."""
    splits = load_examples(config.data, shapes or objective.shapes, seed=config.training.seed, report_dir=run_dir,
                           objective=objective.name)
    log.info("data: %d train and %d held-out examples (%s) from %s", len(splits.train), len(splits.eval),
             splits.shape, config.data.train_file)
    for line in splits.summaries:
        log.info("%s", line)
    return splits


def _tokenize(examples, tokenizer, data):
    """Token ids for a split: all of them, or with ``data.streaming`` a sequence that tokenizes on demand."""
    if isinstance(examples, LazyExamples):
        return tokenize_streamed(examples, tokenizer, data)
    return tokenize_examples(examples, tokenizer, data)


def tokenize_splits(config: Config, splits: DataSplits, tokenizer, report_dir: Path | None = None) -> TokenizedSplits:
    """Both splits tokenized; every example truncation cut or dropped is named in the log and, with a
    ``report_dir``, listed in ``report_dir/truncated_rows.jsonl``."""
    train, train_summary = _tokenize(splits.train, tokenizer, config.data)
    summaries = list(splits.summaries) + [f"train: {train_summary.describe()}"]
    report = [{"split": "train", **row} for row in train_summary.report_rows()]
    held_out: list[TokenizedExample] = []
    if splits.eval:
        held_out, eval_summary = _tokenize(splits.eval, tokenizer, config.data)
        summaries.append(f"held-out: {eval_summary.describe()}")
        report += [{"split": "eval", **row} for row in eval_summary.report_rows()]
    for line in summaries:
        log.info("%s", line)
    if report and report_dir is not None:
        write_jsonl(Path(report_dir) / "truncated_rows.jsonl", report)
        log.info("truncated or dropped examples are listed in %s", Path(report_dir) / "truncated_rows.jsonl")
    return TokenizedSplits(train, held_out, summaries)
