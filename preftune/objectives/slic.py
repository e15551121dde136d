"""SLiC-HF: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Eq. 2: a rank
calibration hinge on the policy's own sequence log-probs plus a cross-entropy regulariser. Reference-free.

SLiC-HF has no β: the margin δ is in nats of summed log-likelihood, so no strength parameter is invented here.
The paper's regulariser is the cross-entropy on a target y_ref (its SFT target); here the chosen completion
plays that role, as a per-token mean like the NLL terms of CPO and RPO. The reference-normalised variant
(RSO's hinge on log-ratios) is the ``hinge`` objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ObjectiveOutput, PairedLogps


@dataclass(frozen=True)
class SLiCParams:
    delta: float = 1.0  # δ: margin by which lp_c must exceed lp_r before the hinge goes quiet
    lambda_: float = 0.1  # λ: weight of the regularising NLL of the chosen completion

    def __post_init__(self):
        if not self.delta >= 0:
            raise ValueError(f"delta must be >= 0 (the calibration margin δ), got {self.delta}")
        if not self.lambda_ >= 0:
            raise ValueError(f"lambda_ must be >= 0 (weight of the NLL term λ), got {self.lambda_}")


def slic_loss(logps: PairedLogps, params: SLiCParams) -> ObjectiveOutput:
    """losses (B,) = max(0, δ - lp_c + lp_r) + λ·(-lp_c/n_c), lp = summed policy log-probs, n = token counts.

    Rewards are the summed log-probs lp_c, lp_r (the quantities the hinge ranks).
    """
    chosen, rejected = logps.policy_chosen_logps, logps.policy_rejected_logps
    calibration = torch.relu(params.delta - chosen + rejected)  # Zhao et al. 2023, Eq. 2, rank calibration
    nll = logps.chosen_nll()  # Eq. 2, regularisation: -log P(y_ref|x), here per token of the chosen completion
    return ObjectiveOutput(
        losses=calibration + params.lambda_ * nll,
        chosen_rewards=chosen.detach(),
        rejected_rewards=rejected.detach(),
        metrics={"nll": nll.mean().detach(), "calibration_loss": calibration.mean().detach()},
    )
