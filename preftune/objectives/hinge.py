"""Hinge loss on reference log-ratios: the rank calibration loss of SLiC-HF (Zhao et al. 2023, "SLiC-HF:
Sequence Likelihood Calibration with Human Feedback", §2) in the reference-normalised form of RSO
(Liu et al. 2024, "Statistical Rejection Sampling Improves Preference Optimization", Eq. 7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class HingeParams:
    beta: float = 0.1  # scale of the log-ratio margin; the hinge is satisfied once β(h_c - h_r) >= 1

    def __post_init__(self):
        check_positive("beta", self.beta)


def hinge_loss(logps: PairedLogps, params: HingeParams) -> ObjectiveOutput:
    """losses (B,) = max(0, 1 - β(h_c - h_r)); pairs already separated by margin 1/β give zero gradient."""
    chosen_logratios, rejected_logratios = logps.upcast().logratios()
    logits = params.beta * (chosen_logratios - rejected_logratios)
    losses = torch.relu(1 - logits)  # Liu et al. 2024, Eq. 7 (hinge)
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )
