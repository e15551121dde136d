"""Unlikelihood: the baseline of Rafailov et al. 2023, "Direct Preference Optimization" (§6), built on the
unlikelihood term log(1 - p) of Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training" (§3).

Reference-free, on pairs: maximise the likelihood of the chosen completion and the *unlikelihood* of the
rejected one, with weight α. Sequence level, on the mean token log-probs that the sums/counts contract gives:
p_r = exp(lp_r/n_r) is the geometric-mean token probability of the rejected completion. Why not the whole
sequence probability exp(lp_r)? For any real completion it underflows to 0, so log(1 - p) would be 0 with no
gradient. Why not Welleck's token-level Σ_t log(1 - p(y_t|y_<t))? It needs per-token log-probs (a live model,
no cached reference sums) and was not chosen here; this form keeps the objective on (B,) sums like SFT and DPO.
1 - p is clamped at 1e-5, as Welleck et al.'s reference code does, so a rejected completion with p → 1 gives a
large finite loss rather than inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ObjectiveOutput, PairedLogps

MIN_ONE_MINUS_P = 1e-5


@dataclass(frozen=True)
class UnlikelihoodParams:
    alpha: float = 1.0  # α: weight of the unlikelihood term on the rejected completion

    def __post_init__(self):
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


def unlikelihood_loss(logps: PairedLogps, params: UnlikelihoodParams) -> ObjectiveOutput:
    """losses (B,) = -lp_c/n_c - α·log(1 - exp(lp_r/n_r)); lp summed policy log-probs (B,), n token counts (B,).

    Rewards are the mean token log-probs lp/n of each side (there is no reference), as for ``sft``.
    """
    chosen = logps.mean_logps("chosen")
    rejected = logps.mean_logps("rejected")
    one_minus_p = (-torch.expm1(rejected)).clamp(min=MIN_ONE_MINUS_P)  # 1 - p_r, exact near p_r = 1
    losses = -chosen - params.alpha * torch.log(one_minus_p)  # NLL(y_w) + α·unlikelihood(y_l)
    return ObjectiveOutput(losses=losses, chosen_rewards=chosen.detach(), rejected_rewards=rejected.detach())
