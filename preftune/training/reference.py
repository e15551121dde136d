"""Reference log-probs: a frozen model, the policy with its LoRA adapters disabled (or, when training
started from an adapter, with that starting adapter swapped back in), or an on-disk cache.

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
import transformers
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import modeling
from ..config import Config
from ..data import Collator, TokenizedExample, content_hash, row_layout
from . import logps
from .distributed import (
    Ranks,
    collate_shard,
    full_tensor,
    is_sharded,
    is_zero3,
    main_decides,
    resharded,
    whole_parameters,
)
from .logps import TokenReference, completion_logps
from .precision import kernel_choice
from .schedule import sequential_batches, shards
from .step import is_stand_in

log = logging.getLogger("preftune")
Batch = dict[str, Tensor]


class ModelReference:
    """A separate frozen model (a copy of the starting policy, or another model given by path)."""

    def __init__(self, model: nn.Module, chunk_size: int, autocast: Callable[[], contextlib.AbstractContextManager],
                 packing: str = "prefix_shared"):
        self.model, self.chunk_size, self.autocast, self.packing = model, chunk_size, autocast, packing
        # under DeepSpeed ZeRO-3: the engine over ``CompletionLogps(model)`` that runs each use (``engines``)
        self.runner: nn.Module | None = None

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Tensor:
        with self.autocast():
            if self.runner is not None:
                return self.runner(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sums
            out = completion_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                   self.chunk_size, packing=self.packing)
        return out.sums

    def release(self) -> None:
        self.model = self.runner = None

    def token_level(self) -> TokenReference:
        """This reference seen position by position (token-level objectives)."""
        return TokenReference(self.model, packing=self.packing)

    def weights_digest(self) -> str:
        """What the reference computes with, for the precomputed cache's key."""
        return weights_digest(self.model)


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


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in resharded(model).named_parameters() if "lora_" in name and p.requires_grad}


class AdapterSwapReference(ModelReference):
    """The policy with the LoRA adapter it started from swapped in: the SFT model when DPO trains an SFT
    adapter further (no second copy of the base weights, one copy of the adapter's)."""

    def __init__(self, model: nn.Module, chunk_size: int, autocast, packing: str = "prefix_shared"):
        super().__init__(model, chunk_size, autocast, packing)
        # held as the parameters are (FSDP2 shards), or whole where they are ZeRO-3 partitions
        self.adapter = {name: (full_tensor(p) if is_zero3(p) else p.detach()).clone()
                        for name, p in lora_parameters(model).items()}

    @contextlib.contextmanager
    def swapped(self):
        params = lora_parameters(self.model)
        with torch.no_grad(), whole_parameters(params.values(), modify=True):  # ZeRO-3: gathered, then split again
            saved = {name: p.detach().clone() for name, p in params.items()}
            for name, p in params.items():
                p.copy_(self.adapter[name])
        try:
            yield
        finally:
            with torch.no_grad(), whole_parameters(params.values(), modify=True):
                for name, p in params.items():
                    p.copy_(saved[name])

    @torch.no_grad()
    def __call__(self, batch) -> Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.swapped():
                return super().__call__(batch)
        finally:
            self.model.train(was_training)

    def token_level(self) -> TokenReference:
        return TokenReference(self.model, disable=self.swapped, packing=self.packing)

    def weights_digest(self) -> str:
        return weights_digest(self.model, self.adapter)


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


def weights_digest(model: nn.Module, adapter: dict[str, Tensor] | None = None) -> str:
    """sha256 of every weight the reference computes with: the model's without its LoRA weights (they are
    off), plus the ``adapter`` tensors swapped in, if any. FSDP2 shards are gathered first (every process
    calls this), so the key is the one a single process computes. So are ZeRO-3 partitions."""
    digest = hashlib.sha256()
    tensors = {name: t for name, t in model.state_dict(keep_vars=True).items() if "lora_" not in name}
    tensors.update({f"adapter/{name}": t for name, t in (adapter or {}).items()})
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(full_tensor(tensor).detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(weights: str, data_hash: str, chunk_precision: str) -> str:
    return hashlib.sha256(f"{weights}|{data_hash}|{chunk_precision}".encode()).hexdigest()[:32]


def precompute(
    reference: ModelReference, batches: Iterable[Batch], size: int, slots: int, cache_file: Path,
    covered: list[int], progress: Callable | None = None, accelerator=None,
) -> CachedReference:
    """Run ``reference`` over every batch once and cache the ``(size, slots)`` table at ``cache_file``
    (NaN where an example has fewer completions).

    A table already at ``cache_file`` is reused: its key covers the reference weights, the tokenized data
    (so tokenizer, text and truncation settings), and whatever sets the numbers' last bits: the precision, the
    kernels, the packing, ``logps.LOGPS_REVISION`` and the torch and transformers versions (before training
    the policy is the reference, and its log-probs must equal the cached ones exactly). With several
    processes (``accelerator``) each computes the rows of its share of ``batches`` (``Shard`` batches), the
    tables are summed across processes, and the main process alone writes the file while the others wait.
    """
    ranks = Ranks.of(accelerator) if accelerator is not None else Ranks()
    cached = load_file(str(cache_file))["reference_logps"] if cache_file.is_file() else None
    reuse = cached is not None and cached.shape[0] == size
    if accelerator is not None and main_decides(accelerator, reuse if ranks.main else None) != reuse:
        raise RuntimeError(f"processes disagree on whether {cache_file} exists: is reference.cache_dir local to "
                           "each machine? Put it on storage every process sees")
    if reuse:
        log.info("reusing cached reference log-probs %s", cache_file)
        return CachedReference(cached)
    table, seen = torch.zeros((size, slots), dtype=torch.float64), torch.zeros((size, slots))
    iterator = progress(batches) if progress else batches
    lockstep = is_sharded(reference.model) if getattr(reference, "model", None) is not None else False
    for batch in iterator:
        if is_stand_in(batch):  # nothing of this batch is this process's
            if lockstep:  # but a sharded model's forward is collective: run it with the others
                reference(batch)
            continue
        example, slot, _ = row_layout(batch)
        rows, slot = batch["index"][example].cpu(), slot.cpu()
        table[rows, slot], seen[rows, slot] = reference(batch).double().cpu(), 1.0
    if accelerator is not None and ranks.world > 1:
        table = accelerator.reduce(table.to(accelerator.device), "sum").cpu()
        seen = accelerator.reduce(seen.to(accelerator.device), "sum").cpu()
    table = table.float().masked_fill(seen == 0, float("nan"))
    if torch.isnan(table[covered, 0]).any():
        raise RuntimeError("reference precomputation did not cover every example; this is a bug in the batching")
    if ranks.main:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_file({"reference_logps": table}, str(tmp))
        tmp.replace(cache_file)
        log.info("cached reference log-probs for %d examples at %s", size, cache_file)
    ranks.barrier()
    return CachedReference(table)


def build_reference(config: Config, objective, policy: nn.Module, autocast) -> ModelReference | None:
    """The live reference ``objective`` (a plan) needs: another model; with LoRA, the policy with the adapter
    it started from (an SFT adapter) or with adapters off; or a frozen copy."""
    if not objective.needs_reference:
        return None
    chunk, packing = config.training.logps_chunk_size, config.training.packing
    if config.reference.name_or_path:
        model = modeling.load_frozen(config.reference.name_or_path, config.model, precision=config.training.precision)
        return ModelReference(modeling.place(model, next(policy.parameters()).device), chunk, autocast, packing)
    if config.lora.enabled and modeling.is_adapter(config.model.name_or_path):
        return AdapterSwapReference(policy, chunk, autocast, packing)
    if config.lora.enabled:
        return AdapterOffReference(policy, chunk, autocast, packing)
    if any(is_zero3(p) for p in policy.parameters()):  # loaded already split (ZeRO-3 init): load it again, split
        model = modeling.load_frozen(config.model.name_or_path, config.model, precision=config.training.precision)
        return ModelReference(modeling.place(model, next(policy.parameters()).device), chunk, autocast, packing)
    return ModelReference(modeling.frozen_copy(policy), chunk, autocast, packing)


def precompute_reference(
    config: Config, reference: ModelReference, examples: list[TokenizedExample], collator: Collator, split: str,
    progress, accelerator,
) -> CachedReference:
    """Reference log-probs of a whole split, cached on disk under a hash of everything they depend on;
    each process of ``accelerator`` computes its share of every batch (``eval_batch_size`` per process)."""
    kernels = kernel_choice(config.training.precision, accelerator.device)  # they set the last bits
    numerics = (f"{config.training.precision}|{config.model.dtype}|{kernels}|{config.training.packing}|"
                f"logps-{logps.LOGPS_REVISION}|torch-{torch.__version__}|transformers-{transformers.__version__}")
    key = cache_key(reference.weights_digest(), content_hash(examples), numerics)
    cache_file = Path(config.reference.cache_dir).expanduser() / f"{key}.safetensors"
    size = max(ex.index for ex in examples) + 1
    slots = max(len(ex.completions) for ex in examples)
    rank, world = accelerator.process_index, accelerator.num_processes
    parts = shards(sequential_batches(len(examples), config.training.eval_batch_size * world), rank, world)
    loader = (collate_shard(examples, part, collator, accelerator.device) for part in parts)
    return precompute(reference, loader, size, slots, cache_file, covered=[ex.index for ex in examples],
                      progress=lambda it: progress(it, total=len(parts), desc=f"reference log-probs ({split})"),
                      accelerator=accelerator)
