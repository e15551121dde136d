"""APO: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions: Addressing
Underspecification in Alignment", Eq. 7 (APO-zero) and Eq. 8 (APO-down).

DPO only fixes the *difference* of the two log-ratios; APO also says which way each should move, anchored at
the reference (log-ratio 0). APO-zero: the chosen outputs are better than the model's own, so raise chosen and
lower rejected. APO-down: the model is already better than the chosen outputs, so lower both, rejected more.
The paper writes Eq. 7 as -σ(βh_c) + σ(βh_r) and Eq. 8 as σ(βh_c) - σ(β(h_c - h_r)); TRL (``apo_zero``,
``apo_down``) adds the constant 1 so the loss lies in [0, 2]. We follow TRL: a constant changes no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class APOParams:
    beta: float = 0.1  # scale of the log-ratios inside the sigmoids

    def __post_init__(self):
        check_positive("beta", self.beta)


def _output(losses: Tensor, chosen_logratios: Tensor, rejected_logratios: Tensor, params: APOParams
            ) -> ObjectiveOutput:
    """Wrap (B,) losses with the implicit rewards β·h, (B,) each, as TRL reports them."""
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )


def apo_zero_loss(logps: PairedLogps, params: APOParams) -> ObjectiveOutput:
    """losses (B,) = 1 - σ(β h_c) + σ(β h_r), h = log π(y|x) - log π_ref(y|x) (sums)."""
    chosen_logratios, rejected_logratios = logps.logratios()
    losses = (1 - torch.sigmoid(params.beta * chosen_logratios)) + torch.sigmoid(
        params.beta * rejected_logratios
    )  # D'Oosterlinck et al. 2024, Eq. 7
    return _output(losses, chosen_logratios, rejected_logratios, params)


def apo_down_loss(logps: PairedLogps, params: APOParams) -> ObjectiveOutput:
    """losses (B,) = σ(β h_c) + 1 - σ(β(h_c - h_r)): lower the chosen log-ratio, the rejected one even more."""
    chosen_logratios, rejected_logratios = logps.logratios()
    losses = torch.sigmoid(params.beta * chosen_logratios) + (
        1 - torch.sigmoid(params.beta * (chosen_logratios - rejected_logratios))
    )  # D'Oosterlinck et al. 2024, Eq. 8
    return _output(losses, chosen_logratios, rejected_logratios, params)
