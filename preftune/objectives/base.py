"""The contract every objective follows: typed inputs, typed parameters, a typed output, declared traits.

An objective is a pure function ``loss(logps, params) -> ObjectiveOutput``. It sees log-prob tensors only:
no model, no accelerator, no collectives. The trainer never asks an objective's name; it reads the
``Objective`` record's traits (``needs_reference``, ``shapes``) to decide what to compute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    # Per-token views, ``(B, T)`` with T the longest completion of the batch, left-aligned (column j holds
    # the j-th completion token, zero where the mask is False). Given only to objectives whose traits ask:
    # ``needs_token_logps`` (policy, and reference when it needs one) and ``needs_token_kl``.
    policy_chosen_token_logps: Tensor | None = None
    policy_rejected_token_logps: Tensor | None = None
    reference_chosen_token_logps: Tensor | None = None
    reference_rejected_token_logps: Tensor | None = None
    chosen_token_mask: Tensor | None = None  # (B, T) bool
    rejected_token_mask: Tensor | None = None
    chosen_token_kl: Tensor | None = None  # (B, T): KL(π_ref ‖ π_θ) over the vocabulary at each position (TDPO)
    rejected_token_kl: Tensor | None = None
    chosen_token_log_sum_sq: Tensor | None = None  # (B, T): log Σ_v π(v | x, y<t)² of the policy (WPO)
    rejected_token_log_sum_sq: Tensor | None = None
    # Running statistics an objective carries between steps (β-DPO, BCO); returned updated in the output.
    state: Mapping[str, Tensor] = field(default_factory=dict)

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
            if value is None or f.name == "state":
                continue
            if "_token_" in f.name:
                _check_token_field(f.name, value, batch, self)
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
            if (f.name.endswith("_logps") or f.name.endswith("_kl")) and getattr(self, f.name) is not None
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


def _check_token_field(name: str, value: Tensor, batch: int, owner) -> None:
    side = "chosen" if "chosen" in name else "rejected"
    mask = getattr(owner, f"{side}_token_mask")
    if mask is None:
        raise ValueError(f"{name} is given without {side}_token_mask (a (B, T) bool tensor)")
    if value.shape != mask.shape or value.shape[0] != batch:
        raise ValueError(f"{name} must have shape (B, T) = {tuple(mask.shape)} like {side}_token_mask, "
                         f"got {tuple(value.shape)}")


@dataclass(frozen=True)
class GroupLogps:
    """Summed completion log-probs of K completions per prompt, for data that is not a pair.

    Tensors are ``(B, K)`` unless noted. Slot order by data shape: unpaired / scored ``[completion]``;
    negatives ``[rejected]``; ranked ``[best, ..., worst]``; negatives_with_samples ``[rejected, sample_1..]``.
    ``mask`` marks the completions that exist (ranked lists may differ in length); ``tokens`` is 1 where
    masked so that divisions stay finite.
    """

    policy_logps: Tensor
    tokens: Tensor
    mask: Tensor
    reference_logps: Tensor | None = None
    labels: Tensor | None = None  # (B,) bool, unpaired data: True = desirable
    scores: Tensor | None = None  # (B, K) float: the data's scalar scores, higher = better
    policy_kl_logps: Tensor | None = None  # (B,) KTO: log-probs of mismatched (prompt_i, completion_j) pairs
    reference_kl_logps: Tensor | None = None  # (B,)
    values: Tensor | None = None  # (B,) DRO: the value head's estimate V(x)
    state: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.policy_logps.shape[0]

    def check(self, objective: str, required: tuple[str, ...]) -> None:
        """Fail with a message naming the field when one is missing or mis-shaped."""
        for name in required:
            if getattr(self, name) is None:
                raise ValueError(f"objective {objective!r} needs {name} but it was not given")
        shape = tuple(self.policy_logps.shape)
        if len(shape) != 2:
            raise ValueError(f"policy_logps must have shape (B, K), got {shape}")
        for name in ("tokens", "mask", "reference_logps", "scores"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape (B, K) = {shape} like policy_logps, got {tuple(value.shape)}")
        for name in ("labels", "policy_kl_logps", "reference_kl_logps", "values"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (shape[0],):
                raise ValueError(f"{name} must have shape (B,) = ({shape[0]},), got {tuple(value.shape)}")

    def upcast(self) -> GroupLogps:
        changes = {name: as_float(getattr(self, name)) for name in
                   ("policy_logps", "reference_logps", "policy_kl_logps", "reference_kl_logps", "values")
                   if getattr(self, name) is not None}
        return replace(self, **changes)

    def logratios(self) -> Tensor:
        """``log π(y|x) - log π_ref(y|x)`` per completion, ``(B, K)``."""
        return self.policy_logps - self.reference_logps


@dataclass(frozen=True)
class ObjectiveOutput:
    """What an objective returns: per-example losses ``(B,)`` and detached implicit rewards ``(B,)``.

    ``metrics`` holds extra scalar (0-d) tensors, logged under their own names. For data that is not a pair,
    ``chosen_rewards`` holds the reward of the preferred / desirable completion and ``rejected_rewards`` that
    of the dispreferred / undesirable one, NaN where an example has none (metrics skip NaN).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Tensor] = field(default_factory=dict)  # updated running statistics, detached


@dataclass(frozen=True)
class Objective:
    """One row of the objectives table: the function, its parameter type and its traits."""

    name: str
    loss: Callable[[PairedLogps, object], ObjectiveOutput]
    params: type
    paper: str
    needs_reference: bool
    # Data shapes the objective trains on: "pairs" (prompt, chosen, rejected), "completions" (prompt,
    # completion), "unpaired" (prompt, completion, label), "scored" (prompt, completion, score), "negatives"
    # (prompt, rejected), "ranked" (prompt, completions, scores|ranks), "negatives_with_samples" (prompt,
    # rejected, samples). Objectives on pairs/completions take PairedLogps, the others GroupLogps.
    shapes: tuple[str, ...] = ("pairs",)
    # Whether the rejected completion enters the loss (False for SFT: the trainer may skip its forward).
    uses_rejected: bool = True
    # Whether one example's loss depends on the rest of its micro-batch (AOT sorts the batch): gradient
    # accumulation is then not equivalent to one larger batch.
    batch_level: bool = False
    # Per-token log-probs (B, T) of policy (and reference when needed): WPO, LD-DPO. Live reference only.
    needs_token_logps: bool = False
    # Per-position KL(π_ref ‖ π_θ) over the vocabulary (TDPO). Live reference only.
    needs_token_kl: bool = False
    # A scalar value head V(x) trained jointly with the policy (DRO).
    needs_value: bool = False
    # GroupLogps fields the objective requires beyond policy_logps/tokens/mask.
    requires: tuple[str, ...] = ()
    # GroupLogps fields it uses when the batch has them (KTO's mismatched rows: none in a batch of one).
    uses: tuple[str, ...] = ()

    @property
    def needs_live_reference(self) -> bool:
        """Objectives that look at the reference token by token, or at rows that depend on the batch's
        composition (KTO's mismatched pairs), cannot use reference sums precomputed per example."""
        token_level = self.needs_token_logps or self.needs_token_kl
        return self.needs_reference and (token_level or "reference_kl_logps" in self.requires + self.uses)


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
