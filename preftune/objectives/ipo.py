"""IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
Eq. 17 (the empirical IPO loss), on token-averaged log-ratios as in the authors' and TRL's implementations."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ObjectiveOutput, PairedLogps, check_positive


@dataclass(frozen=True)
class IPOParams:
    beta: float = 0.1  # τ in the paper: the regularisation towards the reference; the target gap is 1/(2τ)

    def __post_init__(self):
        check_positive("beta", self.beta)


def ipo_loss(logps: PairedLogps, params: IPOParams) -> ObjectiveOutput:
    """losses (B,) = (d - 1/(2β))², d = h_c/n_c - h_r/n_r with h = log π(y|x) - log π_ref(y|x).

    Squared loss instead of DPO's log-sigmoid: the margin is pulled to a finite target rather than pushed to
    infinity, which is what keeps IPO from over-fitting deterministic preferences (Azar et al. §5).
    """
    chosen_logratios, rejected_logratios = logps.upcast().logratios(average=True)
    gap = chosen_logratios - rejected_logratios
    losses = (gap - 1 / (2 * params.beta)) ** 2  # Azar et al. 2023, Eq. 17
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=(params.beta * chosen_logratios).detach(),
        rejected_rewards=(params.beta * rejected_logratios).detach(),
    )
