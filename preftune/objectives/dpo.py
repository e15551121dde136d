"""DPO: Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7; conservative DPO (cDPO) when
``label_smoothing`` > 0 (Mitchell 2023, "A note on DPO with noisy preferences")."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive, check_unit_interval


@dataclass(frozen=True)
class DPOParams:
    beta: float = 0.1  # strength of the KL penalty towards the reference
    label_smoothing: float = 0.0  # ε: assumed probability that a preference label is flipped (cDPO)

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_unit_interval("label_smoothing", self.label_smoothing, upper=0.5, upper_open=True)


def dpo_loss(logps: PairedLogps, params: DPOParams) -> ObjectiveOutput:
    """losses (B,) = -(1-ε) log σ(β h) - ε log σ(-β h), h = log-ratio(chosen) - log-ratio(rejected)."""
    chosen_logratios, rejected_logratios = logps.logratios()
    logits = params.beta * (chosen_logratios - rejected_logratios)  # Eq. 7 argument of σ
    eps = params.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_logratios).detach(),  # implicit reward, Eq. 5
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )
