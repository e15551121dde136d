"""EXO: Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", EXO-pref (Eq. 16)
for K = 2: the reverse KL from the policy's distribution over the pair to the label distribution. Where DPO
minimises the forward KL (mean-seeking), EXO minimises the reverse one (mode-seeking)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class EXOParams:
    beta: float = 0.1  # β_π in the paper: scale of the log-ratios inside the softmax
    # ε: label smoothing of the target p_rh = (1 - ε, ε); the paper recommends 1e-3. ε = 0 puts log 0 in the KL.
    label_smoothing: float = 1e-3

    def __post_init__(self):
        check_positive("beta", self.beta)
        if not 0.0 < self.label_smoothing < 1.0:
            raise ValueError(
                "EXO needs label_smoothing > 0 (and < 1): the target distribution (1 - ε, ε) enters a KL as "
                f"log ε, so ε = 0 is undefined; the paper recommends 1e-3. Got {self.label_smoothing}"
            )


def exo_loss(logps: PairedLogps, params: EXOParams) -> ObjectiveOutput:
    """losses (B,) = KL(p_θ ‖ p_rh) = Σ_i p_θ,i (log p_θ,i - log p_rh,i) over {chosen, rejected}.

    p_θ = softmax(β h_c, β h_r) = (σ(z), σ(-z)) with z = β(h_c - h_r); p_rh = (1 - ε, ε).
    """
    chosen_logratios, rejected_logratios = logps.logratios()
    logits = params.beta * (chosen_logratios - rejected_logratios)
    eps = params.label_smoothing
    log_p_chosen, log_p_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = (  # Ji et al. 2024, Eq. 16 with K = 2
        log_p_chosen.exp() * (log_p_chosen - math.log(1 - eps))
        + log_p_rejected.exp() * (log_p_rejected - math.log(eps))
    )
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )
