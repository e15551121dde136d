"""GPO: Tang et al. 2024, "Generalized Preference Optimization: A Unified Approach to Offline Alignment":
the loss is E[f(β·ρ)], ρ = h_c - h_r, for f a binary-classification loss from their Table 1 (all convex
except Savage's). Choosing f recovers known methods: logistic → DPO, hinge → SLiC (the ``hinge`` objective),
squared → IPO (up to a constant factor and β = 2τ, shown in the tests)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ObjectiveOutput, PairedLogps, check_positive

# Tang et al. 2024, Table 1: the convex functions f(ρ) of the GPO family, each (B,) -> (B,).
GPO_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "logistic": lambda rho: F.softplus(-rho),  # log(1 + e^{-ρ})  (DPO)
    "hinge": lambda rho: torch.relu(1 - rho),  # max(0, 1 - ρ)  (SLiC)
    "squared": lambda rho: (rho - 1) ** 2,  # (ρ - 1)²  (IPO)
    "exponential": lambda rho: torch.exp(-rho),  # e^{-ρ}
    "truncated_squared": lambda rho: torch.relu(1 - rho) ** 2,  # max(0, 1 - ρ)²
    "savage": lambda rho: torch.sigmoid(-rho) ** 2,  # 1 / (1 + e^{ρ})²
}


@dataclass(frozen=True)
class GPOParams:
    beta: float = 0.1  # scale of the log-ratio margin ρ inside f
    loss: str = "logistic"  # which convex f: one of GPO_LOSSES

    def __post_init__(self):
        check_positive("beta", self.beta)
        if self.loss not in GPO_LOSSES:
            raise ValueError(f"unknown GPO loss {self.loss!r}; valid: {', '.join(GPO_LOSSES)}")


def gpo_loss(logps: PairedLogps, params: GPOParams) -> ObjectiveOutput:
    """losses (B,) = f(β(h_c - h_r)) with f = GPO_LOSSES[loss], h = log π(y|x) - log π_ref(y|x) (sums)."""
    chosen_logratios, rejected_logratios = logps.logratios()
    rho = params.beta * (chosen_logratios - rejected_logratios)
    losses = GPO_LOSSES[params.loss](rho)  # Tang et al. 2024, GPO loss f(β ρ_θ), f from Table 1
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )
