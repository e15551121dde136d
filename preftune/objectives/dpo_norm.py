"""Length-normalised DPO: DPO's loss (Rafailov et al. 2023, Eq. 7) on token-averaged log-ratios, the
length-normalisation ablation of Meng et al. 2024 ("SimPO: Simple Preference Optimization with a
Reference-Free Reward") and a length-bias remedy discussed by Park et al. 2024 ("Disentangling Length from
Quality in Direct Preference Optimization", R-DPO); TRL's ``sigmoid_norm``. Summed log-ratios grow with length, so DPO can
raise a margin by lengthening the chosen completion; averaging per token removes that lever."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class DPONormParams:
    # Scale of the *per-token* log-ratio margin. Per-token margins are ~1/length of summed ones, so useful
    # values are larger than DPO's; 0.1 is kept as the default to match TRL's sigmoid_norm.
    beta: float = 0.1

    def __post_init__(self):
        check_positive("beta", self.beta)


def dpo_norm_loss(logps: PairedLogps, params: DPONormParams) -> ObjectiveOutput:
    """losses (B,) = -log σ(β(h_c/n_c - h_r/n_r)), h = log π(y|x) - log π_ref(y|x) summed, n = token counts.

    Rewards are the token-averaged implicit rewards β·h/n (the quantity the loss compares), as for IPO.
    """
    chosen_logratios, rejected_logratios = logps.logratios(average=True)
    logits = params.beta * (chosen_logratios - rejected_logratios)  # DPO Eq. 7 on per-token log-ratios
    return ObjectiveOutput(
        losses=-F.logsigmoid(logits),
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )
