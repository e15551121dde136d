"""TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", Eq. 4–5): the
reference follows the policy during training. Every ``sync_steps`` optimizer steps,
``θ_ref ← α·θ + (1 − α)·θ_ref`` (α = 1 is the paper's hard update, α < 1 its soft one).

A frozen reference copy is updated parameter by parameter. With LoRA the reference is an adapter of its
own (the policy's LoRA tensors when training started, then mixed at each sync) swapped into the model for
the reference forward; mixing LoRA's A and B factors separately is exact for hard updates and the same
approximation other libraries make for soft ones.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .distributed import resharded, shard_like, whole_parameters
from .reference import AdapterSwapReference, ModelReference, lora_parameters

log = logging.getLogger("preftune")


class SyncingAdapterReference(AdapterSwapReference):
    """A reference LoRA adapter swapped into the policy (no second copy of the base weights), mixed towards
    the policy's adapter at each sync."""

    def state(self) -> dict[str, Tensor]:
        return dict(self.adapter)

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.adapter = {name: shard_like(tensors[name], like).clone() for name, like in self.adapter.items()}

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        for name, p in lora_parameters(policy).items():
            with whole_parameters([p]):  # ZeRO-3: the adapter is held whole
                self.adapter[name].mul_(1 - alpha).add_(p.detach(), alpha=alpha)


class CopySyncReference(ModelReference):
    """A frozen copy of the policy that is mixed towards it at each sync."""

    def state(self) -> dict[str, Tensor]:  # the parameters themselves: checkpoints gather them whole
        return dict(resharded(self.model).named_parameters())

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, p in resharded(self.model).named_parameters():
                with whole_parameters([p], modify=True):
                    p.copy_(shard_like(tensors[name], p))

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        """Parameter by parameter: FSDP2 shard by shard (policy and reference are cut alike), ZeRO-3 gathered."""
        reference = dict(resharded(self.model).named_parameters())
        for name, p in resharded(policy).named_parameters():
            mine = reference.get(name)
            if mine is None or getattr(mine, "ds_shape", mine.shape) != getattr(p, "ds_shape", p.shape):
                raise ValueError(f"TR-DPO mixes the policy into the reference, but parameter {name} does not "
                                 "match: the reference must be a copy of the starting model")
            with whole_parameters([p]), whole_parameters([mine], modify=True):
                mine.mul_(1 - alpha).add_(p.detach().to(mine.dtype), alpha=alpha)


def syncing_reference(reference: ModelReference, lora: bool) -> ModelReference:
    """Turn the live reference built for training into one that TR-DPO can update."""
    if lora:
        return SyncingAdapterReference(reference.model, reference.chunk_size, reference.autocast)
    syncing = CopySyncReference(reference.model, reference.chunk_size, reference.autocast)
    syncing.runner = reference.runner
    return syncing
