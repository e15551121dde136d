"""Running an objective: inputs checked at the boundary, computed in fp32 or better; and ``preference_loss``,
the entry point for computing any objective on log-prob tensors with no model involved."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from .base import GroupLogps, Objective, ObjectiveOutput, PairedLogps
from .table import get_objective


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


def preference_loss(name: str, **kwargs: Tensor | float) -> ObjectiveOutput:
    """Compute objective ``name`` on log-prob tensors, with no model involved.

    Tensor keywords are the fields of :class:`PairedLogps` (each ``(B,)``), or of :class:`GroupLogps` for
    objectives on other data shapes (KTO, DRO, NPO, Plackett-Luce, ...); ``state`` passes running statistics;
    every other keyword is one of that objective's parameters (or ``rpo_alpha``). Returns per-example
    ``losses`` and detached rewards. It runs the same ``ObjectivePlan`` the trainer runs.
    """
    from .plan import build_plan

    objective = get_objective(name)
    container = GroupLogps if takes_groups(objective) else PairedLogps
    tensor_fields = {f.name for f in dataclasses.fields(container)}
    tensors = {k: v for k, v in kwargs.items() if k in tensor_fields}
    values = {k: v for k, v in kwargs.items() if k not in tensor_fields}
    rpo_alpha = float(values.pop("rpo_alpha", 0.0))
    required = ("policy_logps", "tokens", "mask") if container is GroupLogps else ("policy_chosen_logps", "chosen_tokens")
    missing = [field for field in required if field not in tensors]
    if missing:
        raise ValueError(f"preference_loss({name!r}) needs {', '.join(missing)} "
                         f"({'(B, K) tensors' if container is GroupLogps else '(B,) tensors'})")
    return build_plan(name, values, rpo_alpha=rpo_alpha).compute(container(**tensors))
