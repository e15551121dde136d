"""β-DPO: Wu et al. 2024, "β-DPO: Direct Preference Optimization with Dynamic β", Eq. 6-7 and its data filter.

DPO whose β follows the batch: β_batch = β0·(1 + α(mean_i M_i - M0)) (Eq. 6), M_i = h_c - h_r the pair's
log-ratio margin, M0 the running margin mean M0 ← m·M0 + (1 - m)·mean_i M_i (Eq. 7), updated with the current
batch before use. The filter keeps a fraction ρ of the batch by Gaussian weights exp(-(M_i - M0)²/2σ²); the
authors sample ⌊ρB⌋ pairs from these weights without replacement. Deterministic variant (a pure function draws
no random numbers): keep the ⌊ρB⌋ pairs (at least one) of largest weight, i.e. with M_i closest to M0 (ties: the
earlier pair); σ then does not matter and is not tracked. As in the authors' code (junkangwu/beta-DPO): M is in
log-ratio units (not scaled by β0), mean_i M_i in Eq. 6 runs over the kept pairs, β_batch is clamped at 1e-3 and
detached, and the loss is averaged over kept pairs (kept pairs are weighted B/⌊ρB⌋, filtered ones 0). Departure:
the authors start M0 at 0, here the first batch initialises it. Statistics are per micro-batch: ``batch_level``;
with several processes the micro-batch is the global one (the trainer gathers it), so mean_i M_i, M0, β_batch
and the filter's choice of kept pairs are those of one process on the whole micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive, check_unit_interval

MIN_BETA = 1e-3  # the authors' clamp on β_batch


@dataclass(frozen=True)
class BetaDPOParams:
    beta: float = 0.1  # β0: the base strength that β_batch scales
    alpha: float = 0.6  # α: how strongly β follows the batch margin (the authors' README example, a = 0.6)
    momentum: float = 0.9  # m of the running margin mean M0 (Eq. 7)
    rho: float = 0.8  # ρ: fraction of each batch kept by the filter (the authors' mode_weight = 1 - ρ = 0.2)

    def __post_init__(self):
        check_positive("beta", self.beta)
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        check_unit_interval("momentum", self.momentum, upper_open=True)
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")


def beta_dpo_loss(logps: PairedLogps, params: BetaDPOParams) -> ObjectiveOutput:
    """losses (B,) = w_i·(-log σ(β_batch·(h_c - h_r))), w_i = B/k for the k kept pairs and 0 for filtered ones.

    state in: ``margin_mean`` (0-d, M0) or empty at the first step; state out: M0 updated with this batch.
    """
    chosen_logratios, rejected_logratios = logps.logratios()
    logits = chosen_logratios - rejected_logratios
    margins = logits.detach()  # M_i
    batch = margins.shape[0]
    previous = logps.state.get("margin_mean")
    margin_mean = margins.mean() if previous is None else (  # Eq. 7
        params.momentum * previous.to(margins) + (1 - params.momentum) * margins.mean())
    kept = max(1, math.floor(params.rho * batch + 1e-9))
    closest = torch.sort((margins - margin_mean).abs(), stable=True).indices[:kept]  # largest Gaussian weights
    keep = torch.zeros_like(margins, dtype=torch.bool).index_fill(0, closest, True)
    beta = params.beta * (1 + params.alpha * (margins[keep].mean() - margin_mean))  # Eq. 6
    beta = beta.clamp(min=MIN_BETA)
    weights = keep.to(logits.dtype) * (batch / kept)
    losses = -F.logsigmoid(beta * logits) * weights
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
        metrics={"beta": beta, "kept_fraction": margins.new_tensor(kept / batch), "margin_mean": margin_mean},
        state={"margin_mean": margin_mean},
    )
