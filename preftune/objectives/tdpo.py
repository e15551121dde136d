"""TDPO: Zeng et al. 2024, "Token-level Direct Preference Optimization" (ICML 2024), Eq. 17 (TDPO1) and
Eq. 19 (TDPO2): DPO's margin corrected by the sequential KL divergences D_SeqKL(x, y; π_ref ‖ π_θ) =
Σ_t KL(π_ref(·|x, y<t) ‖ π_θ(·|x, y<t)), computed over the vocabulary at every completion position."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive, check_unit_interval


@dataclass(frozen=True)
class TDPOParams:
    beta: float = 0.1
    alpha: float = 0.5  # TDPO2's weight of the KL difference (the paper's α)
    version: int = 2  # 1: TDPO1 (Eq. 17), 2: TDPO2 (Eq. 19, the chosen KL under stop-gradient)

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_unit_interval("alpha", self.alpha, upper=10.0)
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 (TDPO1) or 2 (TDPO2), got {self.version}")


def tdpo_loss(logps: PairedLogps, params: TDPOParams) -> ObjectiveOutput:
    """Uses ``chosen_token_kl``/``rejected_token_kl`` ``(B, T)`` with their masks; other tensors ``(B,)``.

    u = h_c - h_r (log-ratio margin); δ = D_SeqKL(y_r) - D_SeqKL(y_c);
    TDPO1: -log σ(β(u - δ));  TDPO2: -log σ(β(u - α(D_SeqKL(y_r) - sg(D_SeqKL(y_c))))).
    """
    chosen_ratio, rejected_ratio = logps.logratios()
    chosen_kl = (logps.chosen_token_kl * logps.chosen_token_mask).sum(-1)  # D_SeqKL(x, y_w; π_ref ‖ π_θ)
    rejected_kl = (logps.rejected_token_kl * logps.rejected_token_mask).sum(-1)
    margin = chosen_ratio - rejected_ratio
    if params.version == 1:
        logits = margin - (rejected_kl - chosen_kl)  # Eq. 17
    else:
        logits = margin - params.alpha * (rejected_kl - chosen_kl.detach())  # Eq. 19
    losses = -F.logsigmoid(params.beta * logits)
    return ObjectiveOutput(
        losses=losses,
        # the token-level reward of the paper: β(log-ratio + sequential KL), as in the authors' code
        chosen_rewards=(params.beta * (chosen_ratio + chosen_kl)).detach(),
        rejected_rewards=(params.beta * (rejected_ratio + rejected_kl)).detach(),
        metrics={"kl/chosen": chosen_kl.mean().detach(), "kl/rejected": rejected_kl.mean().detach()},
    )
