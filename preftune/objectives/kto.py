"""KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", the KTO loss (Eq. 8;
TRL 1.16's ``kto_trainer.py`` cites the same loss as Eq. 7).

Unpaired data: each example is one completion labelled desirable or undesirable. Its value is measured against a
reference point z0 = KL(π_θ ‖ π_ref), which the paper estimates on the micro-batch from *mismatched* pairs
(x_i, y'_i), y'_i the completion of another example, as ẑ0 = max(0, mean_i log π_θ(y'_i|x_i)/π_ref(y'_i|x_i)), with
no gradient through it. Building the mismatched pairs is the data pipeline's job (TRL shifts the completions of a
batch by one); they arrive here as ``policy_kl_logps`` / ``reference_kl_logps``. As in TRL, ẑ0 is detached and
clamped at 0. Because ẑ0 is a batch statistic, the objective is ``batch_level``: with several processes the trainer
gathers the inputs of the whole global micro-batch before calling this function (the mismatched pairs are drawn
from it too), so ẑ0 is the mean over the global micro-batch, exactly as one process computes it (TRL instead
averages per-process estimates). This function itself has no collectives.

A micro-batch of one example has no other completion to mismatch (it happens as the remainder of an epoch):
it then uses the last ẑ0 estimated on a larger micro-batch, carried as running state (``kto/kl``), and 0 (the
estimate's floor) before any was made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import GroupLogps, ObjectiveOutput, check_positive


@dataclass(frozen=True)
class KTOParams:
    beta: float = 0.1  # β: scale of the log-ratio inside the value function
    desirable_weight: float = 1.0  # λ_D
    undesirable_weight: float = 1.0  # λ_U

    def __post_init__(self):
        check_positive("beta", self.beta)
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def kto_loss(logps: GroupLogps, params: KTOParams) -> ObjectiveOutput:
    """losses (B,) = λ_D(1 - σ(β(r - ẑ0))) where ``labels`` is True, λ_U(1 - σ(β(ẑ0 - r))) where it is False.

    policy_logps, reference_logps: (B, 1) summed completion log-probs, r = their difference; labels: (B,) bool,
    True = desirable; policy_kl_logps, reference_kl_logps: (B,) summed log-probs of the mismatched completions.
    Rewards are β·r, under chosen for desirable and rejected for undesirable examples, NaN in the other column.
    """
    if logps.policy_logps.shape[1] != 1:  # unpaired data: one completion per example
        raise ValueError(f"kto takes one completion per example: policy_logps must be (B, 1), got "
                         f"{tuple(logps.policy_logps.shape)}")
    logratios = logps.logratios()[:, 0]
    state = {}
    if logps.policy_kl_logps is not None and logps.reference_kl_logps is not None:
        kl = (logps.policy_kl_logps - logps.reference_kl_logps).mean().clamp(min=0).detach()  # ẑ0, §4.1
        state = {"kto/kl": kl}
    else:  # a micro-batch of one: the last estimate (see the module docstring)
        kl = logps.state.get("kto/kl", logratios.new_zeros(())).to(logratios)
    desirable = logps.labels.bool()
    value = torch.where(desirable, torch.sigmoid(params.beta * (logratios - kl)),  # v(x, y), Eq. 8
                        torch.sigmoid(params.beta * (kl - logratios)))
    weight = torch.full_like(logratios, params.undesirable_weight).masked_fill(desirable, params.desirable_weight)
    losses = weight * (1 - value)  # λ_y - v(x, y) with v carrying λ_y, Eq. 8
    rewards = (params.beta * logratios).detach()
    missing = torch.full_like(rewards, float("nan"))
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=torch.where(desirable, rewards, missing),
        rejected_rewards=torch.where(desirable, missing, rewards),
        metrics={"kl": kl},
        state=state,
    )
