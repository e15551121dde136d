"""DRO: Richemond et al. 2024, "Offline Regularised Reinforcement Learning for Large Language Models Alignment"
(Direct Reward Optimisation, DRO-V), Eq. 9-10.

Single completions with a scalar score s. The objective is the squared residual of the soft Bellman condition,
L(π, V) = ½ E[(s - V(x) - τ·log π(y|x)/π_ref(y|x))²] (Eq. 9), minimised jointly over the policy and a value head
V(x). The paper trains with the gradients of Eq. 10 rather than autograd of Eq. 9:
  policy: -(s - V(x))·∇log π(y|x) + (τ/2)·∇(log π/π_ref)²   (Eq. 9's θ-gradient divided by τ, V held fixed)
  value:  -(s - V(x) - τ·log π/π_ref)·∇V(x)                  (Eq. 9's V-gradient, π held fixed)
Here each comes from its own surrogate with stop-gradients, and the policy surrogate enters as ``p - p.detach()``
(zero in value), so the reported loss is exactly Eq. 9 while backward gives exactly Eq. 10. The paper's τ is
called ``beta``, as the strength of the KL regulariser is everywhere in preftune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import GroupLogps, ObjectiveOutput, check_positive


@dataclass(frozen=True)
class DROParams:
    beta: float = 1.0  # τ of the paper: strength of the KL regularisation towards π_ref

    def __post_init__(self):
        check_positive("beta", self.beta)


def dro_loss(logps: GroupLogps, params: DROParams) -> ObjectiveOutput:
    """losses (B,) = ½(s - V(x) - τ·h)² in value, with Eq. 10's gradients; h = log π(y|x) - log π_ref(y|x).

    policy_logps, reference_logps, scores: (B, 1) (one scored completion per example); values: (B,) V(x) from
    the value head (it receives gradients). Rewards are τ·h, under chosen where the advantage s - V(x) is
    positive and under rejected otherwise (NaN in the other column).
    """
    if logps.policy_logps.shape[1] != 1:  # scored data: one completion per example
        raise ValueError(f"dro takes one completion per example: policy_logps must be (B, 1), got "
                         f"{tuple(logps.policy_logps.shape)}")
    tau = params.beta
    logratios = logps.logratios()[:, 0]
    scores = logps.scores[:, 0].to(logratios.dtype)
    values = logps.values.to(logratios.dtype)
    value_term = 0.5 * (scores - values - tau * logratios.detach()) ** 2  # Eq. 9; its V-gradient is Eq. 10 (value)
    policy_term = -(scores - values.detach()) * logratios + 0.5 * tau * logratios**2  # Eq. 10 (policy)
    losses = value_term + (policy_term - policy_term.detach())
    advantage = (scores - values).detach()
    rewards = (tau * logratios).detach()
    missing = torch.full_like(rewards, float("nan"))
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=torch.where(advantage > 0, rewards, missing),
        rejected_rewards=torch.where(advantage > 0, missing, rewards),
        metrics={"value": values.detach().mean(), "advantage": advantage.mean()},
    )
