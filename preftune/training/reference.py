"""Reference log-probs: a frozen model, the policy with its LoRA adapters disabled, or an on-disk cache.

Every reference answers one question: the summed completion log-probs ``(N,)`` of a batch's rows (for pairs:
chosen rows then rejected rows) under the reference policy, without gradients. ``build_reference`` picks the
live one a run needs; ``precompute_reference`` turns it into a cache keyed by everything it depends on.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import modeling
from ..config import Config
from ..data import Collator, TokenizedExample, batches, content_hash, row_layout
from .logps import TokenReference, completion_logps
from .schedule import sequential_batches

log = logging.getLogger("preftune")
Batch = dict[str, Tensor]


class ModelReference:
    """A separate frozen model (a copy of the starting policy, or another model given by path)."""

    def __init__(self, model: nn.Module, chunk_size: int, autocast: Callable[[], contextlib.AbstractContextManager],
                 packing: str = "prefix_shared"):
        self.model, self.chunk_size, self.autocast, self.packing = model, chunk_size, autocast, packing

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Tensor:
        with self.autocast():
            out = completion_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                   self.chunk_size, packing=self.packing)
        return out.sums

    def release(self) -> None:
        self.model = None

    def token_level(self) -> TokenReference:
        """This reference seen position by position (token-level objectives)."""
        return TokenReference(self.model, packing=self.packing)


class AdapterOffReference(ModelReference):
    """The policy itself with its LoRA adapters disabled: the starting model, with no second copy in memory."""

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return super().__call__(batch)
        finally:
            self.model.train(was_training)

    def release(self) -> None:
        self.model = None  # the policy lives on; only this handle goes

    def token_level(self) -> TokenReference:
        return TokenReference(self.model, disable=self.model.disable_adapter, packing=self.packing)


class CachedReference:
    """Reference log-probs computed once for every completion of a split, looked up by (example, slot)."""

    def __init__(self, table: Tensor):
        self.table = table  # (n, K): slot k of example index i

    def __call__(self, batch: Batch) -> Tensor:
        example, slot, _ = row_layout(batch)
        index = batch["index"][example].cpu()
        return self.table[index, slot.cpu()].to(batch["input_ids"].device)

    def release(self) -> None:
        pass


def weights_digest(model: nn.Module) -> str:
    """sha256 of every weight the reference computes with (LoRA adapter weights excluded: they are off)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(weights: str, data_hash: str, chunk_precision: str) -> str:
    return hashlib.sha256(f"{weights}|{data_hash}|{chunk_precision}".encode()).hexdigest()[:32]


def precompute(
    reference: ModelReference, batches: Iterable[Batch], size: int, slots: int, cache_file: Path,
    covered: list[int], progress: Callable | None = None,
) -> CachedReference:
    """Run ``reference`` over every batch once and cache the ``(size, slots)`` table at ``cache_file``
    (NaN where an example has fewer completions).

    A table already at ``cache_file`` is reused: its key covers the reference weights, the tokenized data
    (so tokenizer, text and truncation settings) and the precision.
    """
    if cache_file.is_file():
        table = load_file(str(cache_file))["reference_logps"]
        if table.shape[0] == size:
            log.info("reusing cached reference log-probs %s", cache_file)
            return CachedReference(table)
    table = torch.full((size, slots), float("nan"))
    iterator = progress(batches) if progress else batches
    for batch in iterator:
        example, slot, _ = row_layout(batch)
        table[batch["index"][example].cpu(), slot.cpu()] = reference(batch).float().cpu()
    if torch.isnan(table[covered, 0]).any():
        raise RuntimeError("reference precomputation did not cover every example; this is a bug in the batching")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    save_file({"reference_logps": table}, str(tmp))
    tmp.replace(cache_file)
    log.info("cached reference log-probs for %d examples at %s", size, cache_file)
    return CachedReference(table)


def build_reference(config: Config, objective, policy: nn.Module, autocast) -> ModelReference | None:
    """The live reference ``objective`` (a plan) needs: adapters off (LoRA), another model, or a frozen copy."""
    if not objective.needs_reference:
        return None
    chunk, packing = config.training.logps_chunk_size, config.training.packing
    if config.reference.name_or_path:
        model = modeling.load_frozen(config.reference.name_or_path, config.model)
        return ModelReference(model.to(next(policy.parameters()).device), chunk, autocast, packing)
    if config.lora.enabled:
        return AdapterOffReference(policy, chunk, autocast, packing)
    return ModelReference(modeling.frozen_copy(policy), chunk, autocast, packing)


def precompute_reference(
    config: Config, reference: ModelReference, examples: list[TokenizedExample], collator: Collator,
    device: torch.device, split: str, progress,
) -> CachedReference:
    """Reference log-probs of a whole split, cached on disk under a hash of everything they depend on."""
    key = cache_key(weights_digest(reference.model), content_hash(examples),
                    f"{config.training.precision}|{config.model.dtype}")
    cache_file = Path(config.reference.cache_dir).expanduser() / f"{key}.safetensors"
    size = max(ex.index for ex in examples) + 1
    slots = max(len(ex.completions) for ex in examples)
    order = sequential_batches(len(examples), config.training.eval_batch_size)
    return precompute(reference, batches(examples, order, collator, device), size, slots, cache_file,
                      covered=[ex.index for ex in examples],
                      progress=lambda it: progress(it, total=len(order), desc=f"reference log-probs ({split})"))
