"""The contract every objective follows: typed inputs, typed parameters, a typed output, declared traits.

An objective is a pure function ``loss(logps, params) -> ObjectiveOutput``. It sees log-prob tensors only:
no model, no accelerator, no collectives. The trainer never asks an objective's name; it reads the
``Objective`` record's traits (``needs_reference``, ``shapes``) to decide what to compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class PairedLogps:
    """Summed completion log-probs of a batch of preference pairs.

    Every tensor is ``(B,)``. ``*_logps`` are sums of per-token log-probs over completion tokens only;
    ``*_tokens`` are the completion token counts (so ``logps / tokens`` is the mean token log-prob).
    The reference fields are ``None`` for reference-free objectives. ``policy_rejected_logps`` and
    ``rejected_tokens`` are ``None`` for single-completion data (the SFT stage).
    """

    policy_chosen_logps: Tensor
    chosen_tokens: Tensor
    policy_rejected_logps: Tensor | None = None
    rejected_tokens: Tensor | None = None
    reference_chosen_logps: Tensor | None = None
    reference_rejected_logps: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.policy_chosen_logps.shape[0]

    def check(self, objective: str, needs_reference: bool, needs_rejected: bool = True) -> None:
        """Fail with a message naming the field when a tensor is missing or has the wrong shape."""
        required = ["policy_chosen_logps", "chosen_tokens"]
        if needs_rejected:
            required += ["policy_rejected_logps", "rejected_tokens"]
        if needs_reference:
            required += ["reference_chosen_logps"] + (["reference_rejected_logps"] if needs_rejected else [])
        for name in required:
            if getattr(self, name) is None:
                raise ValueError(f"objective {objective!r} needs {name} (a (B,) tensor) but it was not given")
        batch = self.batch_size
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"{f.name} must be a torch.Tensor of shape (B,), got {type(value).__name__}")
            if value.shape != (batch,):
                raise ValueError(
                    f"{f.name} must have shape (B,) = ({batch},) like policy_chosen_logps, got {tuple(value.shape)}"
                )
            if f.name.endswith("_logps") and not value.is_floating_point():
                raise TypeError(f"{f.name} must be a floating-point tensor, got {value.dtype}")
        for name in ("chosen_tokens", "rejected_tokens"):
            counts = getattr(self, name)
            if counts is not None and bool((counts <= 0).any()):
                raise ValueError(f"{name} must be positive completion token counts, got {counts.tolist()}")

    def upcast(self) -> PairedLogps:
        """A copy whose fp16/bf16 log-prob tensors are fp32: sums and sigmoids lose too much in half precision."""
        changes = {
            f.name: as_float(getattr(self, f.name))
            for f in fields(self)
            if f.name.endswith("_logps") and getattr(self, f.name) is not None
        }
        return replace(self, **changes)

    def chosen_nll(self) -> Tensor:
        """Per-example mean token negative log-likelihood of the chosen completion, ``(B,)``."""
        return -self.policy_chosen_logps / self.chosen_tokens.to(self.policy_chosen_logps.dtype)

    def mean_logps(self, which: str) -> Tensor:
        """Token-averaged policy log-probs of ``which`` in {"chosen", "rejected"}, ``(B,)``."""
        logps = getattr(self, f"policy_{which}_logps")
        return logps / getattr(self, f"{which}_tokens").to(logps.dtype)

    def logratios(self, average: bool = False) -> tuple[Tensor, Tensor]:
        """``log π(y|x) - log π_ref(y|x)`` for chosen and rejected, each ``(B,)``; token-averaged if ``average``."""
        chosen = self.policy_chosen_logps - self.reference_chosen_logps
        rejected = self.policy_rejected_logps - self.reference_rejected_logps
        if average:
            chosen = chosen / self.chosen_tokens.to(chosen.dtype)
            rejected = rejected / self.rejected_tokens.to(rejected.dtype)
        return chosen, rejected


@dataclass(frozen=True)
class ObjectiveOutput:
    """What an objective returns: per-example losses ``(B,)`` and detached implicit rewards ``(B,)``.

    ``metrics`` holds extra scalar (0-d) tensors, logged under their own names.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """One row of the objectives table: the function, its parameter type and its traits."""

    name: str
    loss: Callable[[PairedLogps, object], ObjectiveOutput]
    params: type
    paper: str
    needs_reference: bool
    # Data shapes the objective trains on: "pairs" (prompt, chosen, rejected), "completions" (prompt, completion).
    shapes: tuple[str, ...] = ("pairs",)
    # Whether the rejected completion enters the loss (False for SFT: the trainer may skip its forward).
    uses_rejected: bool = True
    # Whether one example's loss depends on the rest of its micro-batch (AOT sorts the batch): gradient
    # accumulation is then not equivalent to one larger batch.
    batch_level: bool = False


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_unit_interval(name: str, value: float, upper: float = 1.0, upper_open: bool = False) -> None:
    ok = 0.0 <= value < upper if upper_open else 0.0 <= value <= upper
    if not ok:
        bracket = ")" if upper_open else "]"
        raise ValueError(f"{name} must be in [0, {upper}{bracket}, got {value}")


def as_float(tensor: Tensor) -> Tensor:
    """Objectives compute in fp32 at least, whatever precision the model ran in."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
