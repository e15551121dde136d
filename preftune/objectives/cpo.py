"""CPO: Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
Machine Translation", Eq. 3-4 (the final objective L = L_prefer + L_NLL), with α weighting the NLL term."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class CPOParams:
    beta: float = 0.1  # scale of the log-prob margin inside the sigmoid
    alpha: float = 1.0  # weight of the chosen NLL term, which keeps the policy near the preferred data

    def __post_init__(self):
        check_positive("beta", self.beta)
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0 (weight of the NLL term), got {self.alpha}")


def cpo_loss(logps: PairedLogps, params: CPOParams) -> ObjectiveOutput:
    """losses (B,) = -log σ(β(lp_c - lp_r)) + α·(-lp_c/n_c), lp = summed policy log-probs.

    CPO drops DPO's reference (approximating it by a uniform prior), so the NLL term is what stops the
    policy from drifting: it replaces the KL anchor.
    """
    logps = logps.upcast()
    chosen_rewards = params.beta * logps.policy_chosen_logps
    rejected_rewards = params.beta * logps.policy_rejected_logps
    preference = -F.logsigmoid(chosen_rewards - rejected_rewards)  # Xu et al. 2024, Eq. 3 (L_prefer)
    nll = logps.chosen_nll()  # Eq. 4 (L_NLL), per-example mean over tokens
    return ObjectiveOutput(
        losses=preference + params.alpha * nll,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        metrics={"nll": nll.mean().detach(), "preference_loss": preference.mean().detach()},
    )
