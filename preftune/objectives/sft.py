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
    """losses (B,) = -lp_c/n_c. On pairs (Preferred-FT) the rewards are mean token log-probs, so pair accuracy
    is still reported; on single completions SFT has no reward to report (the loss says it all): NaN, which the
    metrics leave out, as the contract says for a missing reward."""
    logps = logps.upcast()
    chosen = logps.mean_logps("chosen")
    if logps.policy_rejected_logps is not None and logps.rejected_tokens is not None:
        return ObjectiveOutput(losses=-chosen, chosen_rewards=chosen.detach(),
                               rejected_rewards=logps.mean_logps("rejected").detach())
    missing = torch.full_like(chosen, float("nan")).detach()
    return ObjectiveOutput(losses=-chosen, chosen_rewards=missing, rejected_rewards=missing)
