"""AOT: Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport".

Instead of asking each pair to be ordered, AOT asks a *distribution* to dominate another (first-order
stochastic dominance). In one dimension the optimal transport plan between two empirical measures matches
their order statistics, so the relaxed dominance loss is a loss on the differences of *sorted* batches:
  - paired (``aot``): the policy's margin log π(y_w|x) - log π(y_l|x) should dominate the reference's margin;
  - unpaired (``aot_unpaired``): the chosen log-ratios β·h_c should dominate the rejected log-ratios β·h_r.
Both use the logistic loss with label smoothing, as TRL's ``aot`` and ``aot_unpaired``. Because of the
sorting, ``losses[i]`` belongs to the i-th quantile of the batch, not to pair i, and the loss depends on the
whole (micro-)batch: its mean is the objective, and gradient accumulation sorts each micro-batch on its own. With
several processes the sort runs over the global micro-batch (the trainer gathers it; each process then keeps
every N-th quantile's loss, and together they sum to one process's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ObjectiveOutput, PairedLogps, check_positive, check_unit_interval


@dataclass(frozen=True)
class AOTParams:
    beta: float = 0.1  # scale of the sorted differences inside the logistic loss
    label_smoothing: float = 0.0  # ε: weight of the reversed logistic term, as in cDPO

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_unit_interval("label_smoothing", self.label_smoothing, upper=0.5, upper_open=True)


def _sorted_logistic(dominant: Tensor, dominated: Tensor, params: AOTParams) -> Tensor:
    """(B,) smoothed logistic loss on sort(dominant) - sort(dominated): the 1-D OT plan pairs equal quantiles."""
    delta = torch.sort(dominant, dim=0).values - torch.sort(dominated, dim=0).values
    logits = params.beta * delta
    eps = params.label_smoothing
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def _output(losses: Tensor, logps: PairedLogps, params: AOTParams) -> ObjectiveOutput:
    chosen_logratios, rejected_logratios = logps.logratios()
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )


def aot_loss(logps: PairedLogps, params: AOTParams) -> ObjectiveOutput:
    """Paired AOT, losses (B,) by quantile: margin m = lp_c - lp_r of the policy must dominate that of π_ref."""
    policy_margin = logps.policy_chosen_logps - logps.policy_rejected_logps
    reference_margin = logps.reference_chosen_logps - logps.reference_rejected_logps
    return _output(_sorted_logistic(policy_margin, reference_margin, params), logps, params)  # paired AOT


def aot_unpaired_loss(logps: PairedLogps, params: AOTParams) -> ObjectiveOutput:
    """Unpaired AOT, losses (B,) by quantile: chosen log-ratios h_c must dominate rejected log-ratios h_r."""
    chosen_logratios, rejected_logratios = logps.logratios()
    return _output(_sorted_logistic(chosen_logratios, rejected_logratios, params), logps, params)  # unpaired
