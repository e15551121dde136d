"""D²O: Duan et al. 2024, "Negating Negatives: Alignment with Human Negative Samples via Distributional
Dispreference Optimization", the D²O loss (§3).

Only a human *negative* y_l is annotated; K completions y_1..y_K sampled from the starting model stand in for
the preferred side, as a distribution: the loss asks the mean log-ratio of the samples to beat the negative's,
-log σ(β/K·Σ_k log π(y_k|x)/π_r⁻(y_k|x) - α·log π(y_l|x)/π_r⁺(y_l|x)). The paper allows two references π_r⁻ and
π_r⁺; preftune has one reference model, so π_r⁻ = π_r⁺ = π_ref here (with α = β this is DPO with the chosen
log-ratio replaced by the samples' mean). The samples come as a data column, so K may differ per example: the
mean runs over the samples the mask marks present.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import GroupLogps, ObjectiveOutput, check_positive


@dataclass(frozen=True)
class D2OParams:
    beta: float = 0.1  # β: scale of the samples' mean log-ratio
    alpha: float = 0.1  # α: scale of the human negative's log-ratio

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_positive("alpha", self.alpha)


def d2o_loss(logps: GroupLogps, params: D2OParams) -> ObjectiveOutput:
    """losses (B,) = -log σ(β·mean_k h(y_k) - α·h(y_l)), h = log π - log π_ref of each completion.

    policy_logps, reference_logps, mask: (B, 1 + K), slot 0 the human negative y_l, slots 1..K the model samples;
    ``mask`` (B, 1 + K) bool marks present completions (slot 0 and at least one sample must be present).
    Rewards: chosen = β·mean_k h(y_k), rejected = α·h(y_l).
    """
    mask = logps.mask.bool()
    samples = mask[:, 1:]
    counts = samples.sum(dim=1)
    if logps.policy_logps.shape[1] < 2 or not bool(mask[:, 0].all()) or bool((counts == 0).any()):
        raise ValueError("d2o needs slot 0 (the negative) and at least one sample present in every example; "
                         f"mask per example: {mask.tolist()}")
    logratios = logps.logratios()
    # where, not multiply: an absent slot may hold anything (padding, NaN) and must not reach loss or gradient
    sample_mean = torch.where(samples, logratios[:, 1:], 0.0).sum(dim=1) / counts.to(logratios.dtype)
    chosen = params.beta * sample_mean  # β/K Σ_k log π(y_k|x)/π_r⁻(y_k|x)
    rejected = params.alpha * logratios[:, 0]  # α log π(y_l|x)/π_r⁺(y_l|x)
    losses = -F.logsigmoid(chosen - rejected)  # Duan et al. 2024, the D²O loss
    return ObjectiveOutput(losses=losses, chosen_rewards=chosen.detach(), rejected_rewards=rejected.detach())
