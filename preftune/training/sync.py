"""TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", Eq. 4–5): the
reference follows the policy during training. Every ``sync_steps`` optimizer steps,
``θ_ref ← α·θ + (1 − α)·θ_ref`` (α = 1 is the paper's hard update, α < 1 its soft one).

A frozen reference copy is updated parameter by parameter. With LoRA the reference is an adapter of its
own (the policy's LoRA tensors when training started, then mixed at each sync) swapped into the model for
the reference forward; mixing LoRA's A and B factors separately is exact for hard updates and the same
approximation other libraries make for soft ones.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor, nn

from .logps import TokenReference
from .reference import ModelReference

log = logging.getLogger("preftune")


def _lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name and p.requires_grad}


class AdapterSwapReference(ModelReference):
    """The policy with a reference LoRA adapter swapped in (no second copy of the base weights)."""

    def __init__(self, model: nn.Module, chunk_size: int, autocast):
        super().__init__(model, chunk_size, autocast)
        self.adapter = {name: p.detach().clone() for name, p in _lora_parameters(model).items()}

    @contextlib.contextmanager
    def swapped(self):
        params = _lora_parameters(self.model)
        saved = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.adapter[name])
        try:
            yield
        finally:
            with torch.no_grad():
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
        return TokenReference(self.model, disable=self.swapped)

    def release(self) -> None:
        self.model = None

    def state(self) -> dict[str, Tensor]:
        return dict(self.adapter)

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.adapter = {name: tensors[name].clone() for name in self.adapter}

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        for name, p in _lora_parameters(policy).items():
            self.adapter[name].mul_(1 - alpha).add_(p.detach(), alpha=alpha)


class CopySyncReference(ModelReference):
    """A frozen copy of the policy that is mixed towards it at each sync."""

    def state(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(tensors[name])

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        reference = dict(self.model.named_parameters())
        for name, p in policy.named_parameters():
            if name not in reference or reference[name].shape != p.shape:
                raise ValueError(f"TR-DPO mixes the policy into the reference, but parameter {name} does not "
                                 "match: the reference must be a copy of the starting model")
            reference[name].mul_(1 - alpha).add_(p.detach().to(reference[name].dtype), alpha=alpha)


def syncing_reference(reference: ModelReference, lora: bool) -> ModelReference:
    """Turn the live reference built for training into one that TR-DPO can update."""
    if lora:
        return AdapterSwapReference(reference.model, reference.chunk_size, reference.autocast)
    return CopySyncReference(reference.model, reference.chunk_size, reference.autocast)
