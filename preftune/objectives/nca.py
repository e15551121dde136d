"""NCA: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", the NCA loss
for binary preference pairs (K = 2), as contributed by its authors to TRL (``nca_pair``). Unlike DPO, which
only moves the *difference* of rewards, NCA anchors each reward: it raises the chosen reward in absolute
terms, which keeps the chosen likelihood from falling."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class NCAParams:
    beta: float = 0.1  # scale of the implicit reward r = β·log π(y|x)/π_ref(y|x)

    def __post_init__(self):
        check_positive("beta", self.beta)


def nca_loss(logps: PairedLogps, params: NCAParams) -> ObjectiveOutput:
    """losses (B,) = -log σ(r_c) - ½ log σ(-r_c) - ½ log σ(-r_r), r = β·h, h = log π(y|x) - log π_ref(y|x).

    The first term classifies the preferred completion as "data", the two halves classify both completions
    (the K = 2 candidates, each with weight 1/K) as "noise"; Chen et al. 2024, NCA pairwise loss.
    """
    chosen_logratios, rejected_logratios = logps.logratios()
    chosen_rewards = params.beta * chosen_logratios
    rejected_rewards = params.beta * rejected_logratios
    losses = (
        -F.logsigmoid(chosen_rewards)
        - 0.5 * F.logsigmoid(-chosen_rewards)
        - 0.5 * F.logsigmoid(-rejected_rewards)
    )  # Chen et al. 2024, NCA with K = 2
    return ObjectiveOutput(
        losses=losses, chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach()
    )
