"""SPPO: Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", the loss of
Algorithm 1 (Eq. 4.7) with its soft win probability P̂(y ≻ π_t | x).

Data: scored samples ``(prompt, completion, score)`` where ``score`` is P̂, the completion's estimated win
probability against the policy π_t that sampled it (``preftune iterate`` with ``method: sppo`` writes them:
the mean judged win probability of a sample against the prompt's other samples). The reference is π_t
itself. The hard-label special case (P̂ ∈ {0, 1} for chosen / rejected) is ``sppo_hard``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import GroupLogps, ObjectiveOutput, check_positive


@dataclass(frozen=True)
class SPPOParams:
    beta: float = 0.1  # 1/η in the paper: the log-ratio target is η(P̂ - ½) = (P̂ - ½)/β

    def __post_init__(self):
        check_positive("beta", self.beta)


def sppo_loss(logps: GroupLogps, params: SPPOParams) -> ObjectiveOutput:
    """losses (B,) = mean over the example's completions of (h - (P̂ - ½)/β)², h = log π(y|x) - log π_t(y|x).

    policy_logps, reference_logps, scores (P̂ in [0, 1]), mask: (B, K); scored data has K = 1. Eq. 4.7 regresses
    each sample's log-ratio to η(P̂ - ½) with η = 1/β: samples that beat π_t more often than not are pushed up,
    the others down, by an amount proportional to their margin over ½. Rewards are β·h, under chosen for
    P̂ ≥ ½ and under rejected otherwise (NaN in the other column).
    """
    scores = logps.scores.to(logps.policy_logps.dtype)
    present = logps.mask
    if bool(((scores < 0) | (scores > 1) | scores.isnan())[present].any()):
        raise ValueError("sppo: scores are win probabilities P̂(y ≻ π_t | x) and must be in [0, 1]")
    logratios = logps.logratios()
    target = (scores.masked_fill(~present, 0.5) - 0.5) / params.beta  # η(P̂ - ½), η = 1/β
    squared = ((logratios - target) ** 2).masked_fill(~present, 0.0)  # Wu et al. 2024, Eq. 4.7
    losses = squared.sum(1) / present.sum(1).clamp(min=1)
    rewards = (params.beta * logratios).detach().masked_fill(~present, float("nan"))
    winning = scores.masked_fill(~present, 0.5) >= 0.5
    nan = torch.full_like(rewards, float("nan"))
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=torch.where(winning, rewards, nan).nanmean(1),
        rejected_rewards=torch.where(~winning & present, rewards, nan).nanmean(1),
        metrics={"sppo/win_probability": scores[present].mean().detach()},
    )
