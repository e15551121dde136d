"""DPO: Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7; conservative DPO (cDPO) when
``label_smoothing`` > 0 (Mitchell 2023, "A note on DPO with noisy preferences"); f-DPO when ``f_divergence``
is not the reverse KL (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
Diverse Divergence Constraints", Theorem 1 and Table 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ObjectiveOutput, PairedLogps, check_positive, check_unit_interval

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# e^80 ≈ 5.5e34 stays finite in fp32 (max ≈ 3.4e38) even after the β scaling and the subtraction.
MAX_EXPONENT = 80.0
LOG_2 = 0.6931471805599453


@dataclass(frozen=True)
class DPOParams:
    beta: float = 0.1  # strength of the KL penalty towards the reference
    label_smoothing: float = 0.0  # ε: assumed probability that a preference label is flipped (cDPO)
    f_divergence: str = "reverse_kl"  # the divergence to the reference; reverse_kl is plain DPO
    f_alpha: float = 0.5  # α of the α-divergence, 0 < α < 1 (α → 0: reverse KL, α → 1: forward KL)

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_unit_interval("label_smoothing", self.label_smoothing, upper=0.5, upper_open=True)
        if self.f_divergence not in F_DIVERGENCES:
            raise ValueError(f"unknown f_divergence {self.f_divergence!r}; valid: {', '.join(F_DIVERGENCES)}")
        if not 0.0 < self.f_alpha < 1.0:
            raise ValueError(f"f_alpha must be in (0, 1) (Wang et al. 2023, Table 1), got {self.f_alpha}")


def f_prime_scores(logratios: Tensor, params: DPOParams) -> Tensor:
    """f'(u) at u = π/π_ref = exp(``logratios``), (B,), shifted so that f'(1) = 0 (constants cancel in the loss).

    Wang et al. 2023, Table 1: reverse KL f'(u) = log u + 1; forward KL -1/u; Jensen-Shannon log(2u/(1+u));
    α-divergence (1 - u^{-α})/α. Exponents are clamped at MAX_EXPONENT so the scores stay finite.
    """
    kind = params.f_divergence
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp((-logratios).clamp(max=MAX_EXPONENT))  # 1 - 1/u
    if kind == "js_divergence":
        return LOG_2 + F.logsigmoid(logratios)  # log(2u/(1+u)) = log 2 + log σ(log u)
    alpha = params.f_alpha
    return -torch.expm1((-alpha * logratios).clamp(max=MAX_EXPONENT)) / alpha  # (1 - u^{-α})/α


def dpo_loss(logps: PairedLogps, params: DPOParams) -> ObjectiveOutput:
    """losses (B,) = -(1-ε) log σ(z) - ε log σ(-z), z = β(f'(u_c) - f'(u_r)), u = π(y|x)/π_ref(y|x).

    With the reverse KL, f'(u) = log u = h (the log-ratio) and z = β(h_c - h_r): Eq. 7 of the DPO paper.
    Rewards are the implicit rewards β·f'(u) of Wang et al. 2023 (Eq. 5 of the DPO paper for the reverse KL).
    """
    chosen_logratios, rejected_logratios = logps.logratios()
    chosen_scores = f_prime_scores(chosen_logratios, params)
    rejected_scores = f_prime_scores(rejected_logratios, params)
    logits = params.beta * (chosen_scores - rejected_scores)  # DPO Eq. 7 / f-DPO Theorem 1 argument of σ
    eps = params.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_scores).detach(),
        rejected_rewards=(params.beta * rejected_scores).detach(),
    )
