"""Robust DPO (rDPO): Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
Feedback", Eq. 8: an unbiased estimate of the clean-label DPO loss when labels flip with known rate ε."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive, check_unit_interval


@dataclass(frozen=True)
class RobustParams:
    beta: float = 0.1  # strength of the KL penalty towards the reference
    # ε: probability that a preference label is flipped. ε = 1/2 makes labels pure noise (division by zero).
    label_smoothing: float = 0.0

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_unit_interval("label_smoothing", self.label_smoothing, upper=0.5, upper_open=True)


def robust_loss(logps: PairedLogps, params: RobustParams) -> ObjectiveOutput:
    """losses (B,) = [(1-ε)(-log σ(z)) - ε(-log σ(-z))] / (1-2ε), z = β(h_c - h_r).

    Unlike cDPO (which mixes the two labels' losses), the flipped label's loss is *subtracted*, so the
    expectation over label noise equals the clean DPO loss; the estimate can be negative per example.
    """
    chosen_logratios, rejected_logratios = logps.upcast().logratios()
    logits = params.beta * (chosen_logratios - rejected_logratios)
    eps = params.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)  # Eq. 8
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )
