"""Setting a run up: data (validated before any model loads), tokenizer, policy, reference."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import modeling
from ..config import Config
from ..data import Collator, DataSplits, TokenizedExample, content_hash, load_examples, tokenize_examples
from ..objectives import Objective
from .reference import (
    AdapterOffReference,
    CachedReference,
    ModelReference,
    cache_key,
    precompute,
    weights_digest,
)
from .schedule import sequential_batches

log = logging.getLogger("preftune")


@dataclass
class TokenizedSplits:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    summaries: list[str]


def read_data(config: Config, objective, run_dir: Path | None, shapes: tuple[str, ...] | None = None) -> DataSplits:
    """Load and validate every row before anything heavy happens (fails fast on bad data). The file's shape
    must be one the objective trains on (``shapes`` narrows that, e.g. for `preftune eval`)."""
    splits = load_examples(config.data, shapes or objective.shapes, seed=config.training.seed, report_dir=run_dir,
                           objective=objective.name)
    log.info("data: %d train and %d held-out examples (%s) from %s", len(splits.train), len(splits.eval),
             splits.shape, config.data.train_file)
    for line in splits.summaries:
        log.info("%s", line)
    return splits


def tokenize(config: Config, splits: DataSplits, tokenizer) -> TokenizedSplits:
    train, train_summary = tokenize_examples(splits.train, tokenizer, config.data)
    summaries = list(splits.summaries) + [f"train: {train_summary.describe()}"]
    held_out: list[TokenizedExample] = []
    if splits.eval:
        held_out, eval_summary = tokenize_examples(splits.eval, tokenizer, config.data)
        summaries.append(f"eval: {eval_summary.describe()}")
    for line in summaries:
        log.info("%s", line)
    return TokenizedSplits(train, held_out, summaries)


def batches(examples: list[TokenizedExample], positions: list[list[int]], collator: Collator,
            device: torch.device) -> Iterator[dict[str, Tensor]]:
    for group in positions:
        yield {k: v.to(device) for k, v in collator([examples[i] for i in group]).items()}


def build_reference(config: Config, objective: Objective, policy: nn.Module, autocast) -> ModelReference | None:
    """The live reference the objective needs: adapters off (LoRA), another model, or a frozen copy."""
    if not objective.needs_reference:
        return None
    chunk = config.training.logps_chunk_size
    if config.reference.name_or_path:
        model = modeling.load_frozen(config.reference.name_or_path, config.model).to(_device_of(policy))
        return ModelReference(model, chunk, autocast)
    if config.lora.enabled:
        return AdapterOffReference(policy, chunk, autocast)
    return ModelReference(modeling.frozen_copy(policy), chunk, autocast)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def precompute_reference(
    config: Config, reference: ModelReference, examples: list[TokenizedExample], collator: Collator,
    device: torch.device, split: str, progress,
) -> CachedReference:
    """Reference log-probs of a whole split, cached on disk under a hash of everything they depend on."""
    model = reference.model
    key = cache_key(weights_digest(model), content_hash(examples), f"{config.training.precision}|{config.model.dtype}")
    cache_file = Path(config.reference.cache_dir).expanduser() / f"{key}.safetensors"
    size = max(ex.index for ex in examples) + 1
    slots = max(len(getattr(ex, "completions", (0, 0))) for ex in examples)
    order = sequential_batches(len(examples), config.training.eval_batch_size)
    return precompute(reference, batches(examples, order, collator, device), size, slots, cache_file,
                      covered=[ex.index for ex in examples],
                      progress=lambda it: progress(it, total=len(order), desc=f"reference log-probs ({split})"))
