"""DPO-Positive (DPOP): Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
DPO-Positive", Eq. 3. DPO can lower the chosen completion's likelihood as long as the rejected one falls
faster; DPOP adds a penalty inside the sigmoid whenever the chosen log-ratio drops below zero."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class DPOPParams:
    beta: float = 0.1  # strength of the KL penalty towards the reference
    lambda_: float = 50.0  # λ: weight of the penalty on log(π_ref(y_w|x) / π(y_w|x)) when it is positive

    def __post_init__(self):
        check_positive("beta", self.beta)
        if not self.lambda_ >= 0:
            raise ValueError(f"lambda_ must be >= 0 (the DPOP penalty weight λ), got {self.lambda_}")


def dpop_loss(logps: PairedLogps, params: DPOPParams) -> ObjectiveOutput:
    """losses (B,) = -log σ(β·(h_c - h_r - λ·max(0, -h_c))), h = log π(y|x) - log π_ref(y|x) (sums, (B,)).

    max(0, -h_c) = max(0, log π_ref(y_w|x)/π(y_w|x)) is zero while the policy keeps at least the reference's
    likelihood of the chosen completion, so DPOP equals DPO there; λ sits inside β as in the paper.
    """
    chosen_logratios, rejected_logratios = logps.logratios()
    penalty = torch.relu(-chosen_logratios)  # Pal et al. 2024, Eq. 3: max(0, log π_ref(y_w|x) / π_θ(y_w|x))
    logits = params.beta * (chosen_logratios - rejected_logratios - params.lambda_ * penalty)  # Eq. 3
    return ObjectiveOutput(
        losses=-F.logsigmoid(logits),
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
        metrics={"dpop_penalty": penalty.mean().detach()},
    )
