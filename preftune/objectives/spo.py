"""SPO: Swamy et al. 2024, "A Minimaximalist Approach to Reinforcement Learning from Human Feedback".

Self-play: a completion's reward is its win rate against the other samples the *same* policy drew for the
prompt (§3, the self-play reward r(x, y) = P(y ≻ y') averaged over y' ~ π), so the reward moves with the
policy and needs no reward model. The paper optimises it with an RL algorithm (PPO); this is the simplest
faithful estimator of the same objective, chosen and documented here: REINFORCE with a leave-one-out baseline
over the K samples of each prompt (Kool et al. 2019; "RLOO", Ahmadian et al. 2024) and a KL penalty towards the
reference folded into the reward (Ziegler et al. 2019; Stiennon et al. 2020, Eq. 2):

    r̃_k = r_k - β·(log π(y_k|x) - log π_ref(y_k|x))      (detached)
    A_k = r̃_k - mean_{j≠k} r̃_j                         (leave-one-out baseline)
    loss = -mean_k A_k · log π(y_k|x)

whose gradient is an unbiased estimate of -∇(E[r] - β·KL(π‖π_ref)) for samples drawn from π (E_π[∇log π] = 0
makes the penalty's own score-function term vanish in expectation). It is only correct on the policy's own
fresh samples, which is why it is not in the objectives table: ``preftune online`` with ``method: spo`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import GroupLogps, Objective, ObjectiveOutput, check_positive


@dataclass(frozen=True)
class SPOParams:
    beta: float = 0.05  # weight of the KL penalty towards the reference folded into the reward

    def __post_init__(self):
        check_positive("beta", self.beta)


def self_play_rewards(win: Tensor) -> Tensor:
    """(B, K) rewards from a (B, K, K) matrix ``win[b, i, j]`` = P(y_i ≻ y_j): the mean over j ≠ i (the
    diagonal is ignored), the fraction of the prompt's other samples the judge prefers y_i to."""
    k = win.shape[-1]
    off_diagonal = win.sum(-1) - win.diagonal(dim1=-2, dim2=-1)
    return off_diagonal / (k - 1)


def leave_one_out_advantages(rewards: Tensor) -> Tensor:
    """(B, K): each reward minus the mean of the prompt's other K - 1 rewards."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 samples per prompt, got {k}")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def spo_loss(logps: GroupLogps, params: SPOParams) -> ObjectiveOutput:
    """losses (B,) = -mean_k A_k · log π(y_k|x) (see the module docstring). policy_logps, reference_logps,
    scores (the self-play rewards r_k), mask: (B, K) with every slot present (K fresh samples per prompt)."""
    if not bool(logps.mask.all()):
        raise ValueError("spo needs all K samples of every prompt (the leave-one-out baseline averages them)")
    logratios = logps.logratios()
    shaped = logps.scores.to(logratios.dtype) - params.beta * logratios.detach()  # r - β log π/π_ref
    advantages = leave_one_out_advantages(shaped)
    losses = -(advantages * logps.policy_logps).mean(1)
    best = shaped.argmax(1, keepdim=True)
    worst = shaped.argmin(1, keepdim=True)
    rewards = (params.beta * logratios).detach()
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=rewards.gather(1, best)[:, 0],
        rejected_rewards=rewards.gather(1, worst)[:, 0],
        metrics={"spo/reward": logps.scores.mean().detach(), "spo/kl": logratios.detach().mean(),
                 "spo/advantage_abs": advantages.abs().mean()},
    )


SPO = Objective(
    "spo", spo_loss, SPOParams, needs_reference=True, shapes=("ranked",), requires=("scores",),
    paper="Swamy et al. 2024, A Minimaximalist Approach to Reinforcement Learning from Human Feedback "
    "(self-play win-rate reward; REINFORCE with a leave-one-out baseline and a KL penalty)",
)
