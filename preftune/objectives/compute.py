"""Running an objective: inputs checked at the boundary, computed in fp32 or better."""

from __future__ import annotations

from .base import GroupLogps, Objective, ObjectiveOutput, PairedLogps


def compute(objective: Objective, logps: PairedLogps | GroupLogps, params: object) -> ObjectiveOutput:
    """Check the inputs at the boundary, then run the objective in fp32 or better."""
    if isinstance(logps, GroupLogps):
        required = objective.requires + (("reference_logps",) if objective.needs_reference else ())
        logps.check(objective.name, required)
        return objective.loss(logps.upcast(), params)
    # An objective that uses the rejected completion must get it: missing tensors are a ValueError naming
    # the field here, not a TypeError from inside the formula.
    logps.check(objective.name, objective.needs_reference, needs_rejected=objective.uses_rejected)
    token_fields = (["chosen_token_kl", "rejected_token_kl"] if objective.needs_token_kl else []) + (
        ["policy_chosen_token_logps", "policy_rejected_token_logps"] if objective.needs_token_logps else [])
    for name in token_fields:
        if getattr(logps, name) is None:
            raise ValueError(f"objective {objective.name!r} needs {name} (a (B, T) tensor with its mask)")
    return objective.loss(logps.upcast(), params)


def takes_groups(objective: Objective) -> bool:
    """Objectives on pairs / completions take PairedLogps; every other data shape comes as GroupLogps."""
    return not {"pairs", "completions"} & set(objective.shapes)
