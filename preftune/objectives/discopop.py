"""DiscoPOP: Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
Models", the log-ratio modulated loss (LRML), Eq. 5: a sigmoid-weighted blend of the logistic (DPO) loss and
the exponential loss, the weight set by the margin itself. Found by LLM-driven search; it is not convex."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class DiscoPOPParams:
    beta: float = 0.1  # scale of the log-ratio margin ρ
    tau: float = 0.05  # τ: temperature of the mixing sigmoid σ(βρ/τ); the paper's value

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_positive("tau", self.tau)


def discopop_loss(logps: PairedLogps, params: DiscoPOPParams) -> ObjectiveOutput:
    """losses (B,) = (1 - σ(z/τ))·log(1 + e^{-z}) + σ(z/τ)·e^{-z}, z = β(h_c - h_r), h = log-ratios (sums).

    The exponential term is computed as exp(-z + log σ(z/τ)): identical in value, but finite where e^{-z}
    alone would overflow while its weight σ(z/τ) underflows to 0 (z very negative), which gave NaN.
    The discovered code used σ(ρ) as the weight, which is σ(βρ/τ) at the search's β = τ = 0.05.
    """
    chosen_logratios, rejected_logratios = logps.logratios()
    logits = params.beta * (chosen_logratios - rejected_logratios)
    logistic = F.softplus(-logits) * torch.sigmoid(-logits / params.tau)  # (1 - σ(z/τ))·f_logistic(z)
    exponential = torch.exp(F.logsigmoid(logits / params.tau) - logits)  # σ(z/τ)·f_exp(z)
    return ObjectiveOutput(
        losses=logistic + exponential,  # Lu et al. 2024, Eq. 5
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )
