"""NPO: Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective
Unlearning", Eq. 3.

Negatives only (unlearning): the DPO loss with the preferred completion dropped, -(2/β) log σ(-β h), which is
bounded below and decays the gradient once π(y|x) has fallen under π_ref(y|x), unlike gradient ascent on the NLL
(its β → 0 limit, where the gradient tends to ∇h). The paper's optional retain-set term (an NLL on data to keep)
is not part of this function: it is a separate loss on other data that the trainer would add; ``rpo_alpha``-style
weighting of a chosen-completion NLL does not apply, since there is no chosen completion here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import GroupLogps, ObjectiveOutput, check_positive


@dataclass(frozen=True)
class NPOParams:
    beta: float = 0.1  # β: inverse temperature; β → 0 recovers gradient ascent on the negatives

    def __post_init__(self):
        check_positive("beta", self.beta)


def npo_loss(logps: GroupLogps, params: NPOParams) -> ObjectiveOutput:
    """losses (B,) = (2/β)·log(1 + (π/π_ref)^β) = (2/β)·softplus(β·h), h = log π(y|x) - log π_ref(y|x).

    policy_logps, reference_logps: (B, 1) summed log-probs of the negative (rejected) completion.
    Rewards: rejected = β·h; chosen is NaN (there is no preferred completion).
    """
    if logps.policy_logps.shape[1] != 1:  # negatives-only data: one completion per example
        raise ValueError(f"npo takes one completion per example: policy_logps must be (B, 1), got "
                         f"{tuple(logps.policy_logps.shape)}")
    logratios = logps.logratios()[:, 0]
    losses = (2 / params.beta) * F.softplus(params.beta * logratios)  # Zhang et al. 2024, Eq. 3
    rejected = (params.beta * logratios).detach()
    return ObjectiveOutput(
        losses=losses, chosen_rewards=torch.full_like(rejected, float("nan")), rejected_rewards=rejected
    )
