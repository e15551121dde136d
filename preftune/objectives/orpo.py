"""ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eq. 6-7.
Reference-free: an odds-ratio penalty is added to the SFT loss, so one stage does both."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class ORPOParams:
    beta: float = 0.1  # λ in the paper: weight of the odds-ratio term relative to the NLL

    def __post_init__(self):
        check_positive("beta", self.beta)


def _log_odds(mean_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) with log p = ``mean_logps`` (< 0), (B,); expm1 keeps 1 - p accurate when p ≈ 1."""
    return mean_logps - torch.log(-torch.expm1(mean_logps))  # Hong et al. 2024, Eq. 4 (odds)


def orpo_loss(logps: PairedLogps, params: ORPOParams) -> ObjectiveOutput:
    """losses (B,) = -a_c - β·log σ(log odds(a_c) - log odds(a_r)), a = mean token log-prob (must be < 0)."""
    logps = logps.upcast()
    chosen, rejected = logps.mean_logps("chosen"), logps.mean_logps("rejected")
    log_odds_diff = _log_odds(chosen) - _log_odds(rejected)
    ratio = F.logsigmoid(log_odds_diff)  # Eq. 7: log σ(log OR)
    nll = -chosen  # Eq. 6 L_SFT, per-example mean over tokens
    return ObjectiveOutput(
        losses=nll - params.beta * ratio,  # Eq. 6: L_SFT + λ·L_OR, with L_OR = -log σ(log OR)
        chosen_rewards=(params.beta * chosen).detach(),  # as TRL reports them
        rejected_rewards=(params.beta * rejected).detach(),
        metrics={
            "log_odds_ratio": ratio.mean().detach(),
            "log_odds_chosen": log_odds_diff.mean().detach(),
            "nll": nll.mean().detach(),
        },
    )
