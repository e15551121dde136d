"""SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6.
Reference-free: the implicit reward is the policy's length-normalised log-prob, scaled by β."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class SimPOParams:
    beta: float = 2.0  # scale of the length-normalised reward
    gamma: float = 1.0  # γ: target reward margin, absolute (the paper's γ, not TRL's γ/β ratio)

    def __post_init__(self):
        check_positive("beta", self.beta)
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0 (the target reward margin), got {self.gamma}")


def simpo_loss(logps: PairedLogps, params: SimPOParams) -> ObjectiveOutput:
    """losses (B,) = -log σ(β·lp_c/n_c - β·lp_r/n_r - γ), lp = summed policy log-probs, n = token counts."""
    logps = logps.upcast()
    chosen_rewards = params.beta * logps.mean_logps("chosen")  # Eq. 4: length-normalised reward
    rejected_rewards = params.beta * logps.mean_logps("rejected")
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - params.gamma)  # Meng et al. 2024, Eq. 6
    return ObjectiveOutput(
        losses=losses, chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach()
    )
