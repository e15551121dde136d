"""BCO: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", on pairs.

BCO trains a binary classifier whose logit is the implicit reward r = β·log π(y|x)/π_ref(y|x): chosen
completions are class 1, rejected ones class 0. Its binary cross-entropy upper-bounds the DPO loss, and the
paper's reward shift δ (the mean of the rewards) tightens the bound: -log σ(r_c - δ) - log σ(-(r_r - δ)).
δ is the running mean of *every* reward seen so far, current batch included (count-weighted, as TRL's
``RunningMoments`` in its BCO trainer and in ``bco_pair`` before TRL 1.x; TRL 1.16's ``bco_pair`` dropped δ, i.e.
δ = 0). TRL's ``bco_pair`` fed one batch mean per step, which equals this count-weighted mean when every batch
has the same size. δ is a statistic, not a parameter: it is detached and carried in ``state``; the first batch
initialises it, and because it includes the current batch the objective is ``batch_level``: with several processes
the trainer hands this function the whole global micro-batch (gathered), so δ, and the count of rewards behind it,
advance by the global micro-batch's 2B rewards, identically on every process, as in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class BCOParams:
    beta: float = 0.1  # β: scale of the implicit reward (the classifier's logit)

    def __post_init__(self):
        check_positive("beta", self.beta)


def bco_loss(logps: PairedLogps, params: BCOParams) -> ObjectiveOutput:
    """losses (B,) = -log σ(r_c - δ) - log σ(-(r_r - δ)), r = β·h (B,) per side, δ the running reward mean.

    state in: ``delta`` (0-d) and ``count`` (0-d, rewards seen), or empty at the first step; state out: both
    updated with this batch's 2B rewards, detached.
    """
    chosen_logratios, rejected_logratios = logps.logratios()
    chosen = params.beta * chosen_logratios
    rejected = params.beta * rejected_logratios
    rewards = torch.cat([chosen, rejected]).detach()
    if logps.state:
        if not {"delta", "count"} <= set(logps.state):
            raise ValueError(f"bco state needs 'delta' and 'count', got {sorted(logps.state)}")
        seen = logps.state["count"].to(rewards.device, torch.float64)
        previous = logps.state["delta"].to(rewards)
    else:  # first step: δ is this batch's mean reward
        seen, previous = torch.zeros((), dtype=torch.float64, device=rewards.device), rewards.mean()
    total = seen + rewards.numel()
    delta = previous + (rewards.mean() - previous) * (rewards.numel() / total).to(rewards.dtype)  # mean of all seen
    losses = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))  # BCE with reward shift δ
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=chosen.detach(),
        rejected_rewards=rejected.detach(),
        metrics={"delta": delta},
        state={"delta": delta, "count": total.round().long()},
    )
