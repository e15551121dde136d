"""Reward-model objectives (pure functions of scalar rewards): Bradley–Terry on pairs, Plackett–Luce on
ranked lists, and the pairwise accuracy both are judged by.

Bradley–Terry (Bradley & Terry 1952; the reward model of Ouyang et al. 2022, Eq. 1) models
P(chosen ≻ rejected) = σ(r_c - r_r). Plackett–Luce (Plackett 1975; Luce 1959) extends it to a ranking of K
completions: pick the best among all, then the best among the rest, ... For K = 2 the two are the same
loss, so one batch may mix pairs and lists: a pair is a list of two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..objectives.plackett_luce import plackett_luce_nll


def _check(rewards: Tensor, mask: Tensor) -> None:
    if rewards.ndim != 2 or mask.shape != rewards.shape:
        raise ValueError(f"rewards and mask must both be (B, K); got {tuple(rewards.shape)} and {tuple(mask.shape)}")
    if not bool(mask[:, 0].all()) or bool((mask.sum(dim=1) < 2).any()):
        raise ValueError("every ranked list needs its best completion (slot 0) and at least one more")


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """losses (B,) = -log σ(r_c - r_r); chosen, rejected: (B,) rewards."""
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise ValueError(f"chosen and rejected must both be (B,); got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    return -F.logsigmoid(chosen - rejected)  # Ouyang et al. 2022, Eq. 1


def plackett_luce_loss(rewards: Tensor, mask: Tensor) -> Tensor:
    """losses (B,) = -Σ_k [r_k - log Σ_{j≥k} exp(r_j)] over present slots k, j.

    rewards: (B, K) ordered best first; mask: (B, K) bool, False where a shorter list has no completion.
    Ties: Plackett–Luce has no likelihood for a tie, so the given order is taken as strict (the data loader
    keeps tied completions in file order, as the Plackett–Luce DPO objective does).
    """
    _check(rewards, mask)
    return plackett_luce_nll(rewards.float(), mask.bool())


def ranked_pairs_mask(mask: Tensor, scores: Tensor | None = None) -> Tensor:
    """(B, K, K) bool: True at [b, i, j] when slot i is ranked above slot j (i < j), both are present and,
    with ``scores`` (B, K) in slot order, their scores differ (a tie states no preference)."""
    mask = mask.bool()
    k = mask.shape[1]
    above = torch.ones(k, k, dtype=torch.bool, device=mask.device).triu(diagonal=1)
    pairs = above & mask[:, :, None] & mask[:, None, :]
    if scores is not None:
        pairs &= scores[:, :, None] != scores[:, None, :]
    return pairs


def pairwise_accuracy(rewards: Tensor, mask: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(correct (B,), compared (B,)): per list, how many of its ranked pairs (see ``ranked_pairs_mask``) the
    rewards order strictly right, r_i > r_j, and how many pairs there are. For pairs: 1 or 0 of 1."""
    _check(rewards, mask)
    pairs = ranked_pairs_mask(mask, scores)
    right = rewards[:, :, None] > rewards[:, None, :]
    return (pairs & right).sum(dim=(1, 2)), pairs.sum(dim=(1, 2))
