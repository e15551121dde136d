"""Supervised fine-tuning: mean token NLL of the chosen (or only) completion. Also the Preferred-FT baseline
of Rafailov et al. 2023, "Direct Preference Optimization" (§6), and the first stage of every DPO recipe."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ObjectiveOutput, PairedLogps


@dataclass(frozen=True)
class SFTParams:
    """SFT takes no parameters; the empty type still makes ``sft.beta = ...`` an error."""


def sft_loss(logps: PairedLogps, params: SFTParams) -> ObjectiveOutput:
    """losses (B,) = -lp_c/n_c; rewards are mean token log-probs so pair accuracy is still reported."""
    logps = logps.upcast()
    chosen = logps.mean_logps("chosen")
    if logps.policy_rejected_logps is not None and logps.rejected_tokens is not None:
        rejected = logps.mean_logps("rejected").detach()
    else:  # single-completion data: there is nothing to compare against
        rejected = torch.full_like(chosen, float("nan")).detach()  # no rejected completion: NaN, as the contract says
    return ObjectiveOutput(losses=-chosen, chosen_rewards=chosen.detach(), rejected_rewards=rejected)
