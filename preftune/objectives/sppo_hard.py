"""SPPO (hard labels): Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
the loss of Algorithm 1 (Eq. 4.7) with the win probability P̂(y ≻ π_t | x) set to 1 for the chosen and 0 for
the rejected completion, as in TRL's ``sppo_hard``. The paper's own P̂ is a soft win rate estimated with a
preference model (PairRM); that version needs scored samples, a different data shape."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class SPPOHardParams:
    beta: float = 0.1  # 1/η in the paper: the log-ratio targets are ±η/2 = ±1/(2β)

    def __post_init__(self):
        check_positive("beta", self.beta)


def sppo_hard_loss(logps: PairedLogps, params: SPPOHardParams) -> ObjectiveOutput:
    """losses (B,) = (h_c - 1/(2β))² + (h_r + 1/(2β))², h = log π(y|x) - log π_ref(y|x) (sums).

    Eq. 4.7 is (h - η(P̂ - ½))² per completion; with P̂ = 1 (chosen) and 0 (rejected) and η = 1/β the two
    targets are +1/(2β) and -1/(2β). Squared regression to fixed targets: like IPO, each log-ratio is pulled
    to a finite value rather than pushed apart without bound. π_ref is the previous iteration's policy π_t.
    """
    chosen_logratios, rejected_logratios = logps.logratios()
    target = 1 / (2 * params.beta)  # η(P̂ - ½) with η = 1/β, P̂ ∈ {1, 0}
    losses = (chosen_logratios - target) ** 2 + (rejected_logratios + target) ** 2  # Wu et al. 2024, Eq. 4.7
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )
