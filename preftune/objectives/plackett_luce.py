"""Plackett-Luce DPO: Rafailov et al. 2023, "Direct Preference Optimization", Appendix A.3, Eq. 18.

A ranking τ of K completions has Plackett-Luce likelihood Π_k exp(r_k) / Σ_{j≥k} exp(r_j) (pick the best, then
the best of the rest, ...); with the implicit reward r = β·log π/π_ref this is the listwise DPO objective, and
for K = 2 it is exactly DPO (Eq. 7). The slots arrive best first. Ranked lists may differ in length: a slot the
mask marks absent leaves every sum, so it is as if the list were shorter. Ties: Plackett-Luce has no likelihood
for a tie, so the slot order given is taken as strict; the data loader orders best first with a stable sort, so
completions with tied scores keep their file order and the earlier one is treated as preferred.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import GroupLogps, ObjectiveOutput, check_positive


@dataclass(frozen=True)
class PlackettLuceParams:
    beta: float = 0.1  # β: scale of the implicit reward β·log π/π_ref

    def __post_init__(self):
        check_positive("beta", self.beta)


def plackett_luce_nll(rewards: Tensor, mask: Tensor) -> Tensor:
    """losses (B,) = -Σ_k [r_k - log Σ_{j≥k} exp(r_j)] over present slots k, j: the negative log-likelihood of
    the ranking (best first) under Plackett-Luce with scores ``rewards`` (B, K); ``mask`` (B, K) bool.

    The reward-model trainer ranks with the same likelihood (its rewards are a head's outputs, not β·h)."""
    # An absent slot gets the most negative finite number, not -inf: exp() of it is exactly 0 in every sum, and
    # logcumsumexp's backward stays finite (an all -inf tail would give inf - inf = NaN gradients).
    logits = rewards.masked_fill(~mask, torch.finfo(rewards.dtype).min)
    tails = torch.logcumsumexp(logits.flip(1), dim=1).flip(1)  # log Σ_{j≥k} exp(r_j)
    return -torch.where(mask, logits - tails, 0.0).sum(dim=1)  # Rafailov et al. 2023, Eq. 18


def plackett_luce_loss(logps: GroupLogps, params: PlackettLuceParams) -> ObjectiveOutput:
    """losses (B,) = -Σ_k [β h_k - log Σ_{j≥k} exp(β h_j)] over present slots k, j; h = log π - log π_ref.

    policy_logps, reference_logps: (B, K) summed log-probs, ordered best first; mask: (B, K) bool, slot 0 and at
    least one other present. Rewards: chosen = β·h of the best, rejected = β·h of the worst present completion.
    """
    mask = logps.mask.bool()
    if not bool(mask[:, 0].all()) or bool((mask.sum(dim=1) < 2).any()):
        raise ValueError(f"plackett_luce needs the best completion (slot 0) and at least one more in every "
                         f"ranked list; mask per example: {mask.tolist()}")
    rewards = params.beta * logps.logratios()
    losses = plackett_luce_nll(rewards, mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    worst = torch.where(mask, positions, -1).max(dim=1).values
    detached = rewards.detach()
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=detached[:, 0],
        rejected_rewards=detached.gather(1, worst.unsqueeze(1)).squeeze(1),
    )
