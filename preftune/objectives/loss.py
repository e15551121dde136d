"""``preference_loss``: any objective of the table on log-prob tensors, with no model involved."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from .base import GroupLogps, ObjectiveOutput, PairedLogps
from .compute import takes_groups
from .plan import build_plan
from .table import get_objective


def preference_loss(name: str, **kwargs: Tensor | float) -> ObjectiveOutput:
    """Compute objective ``name`` on log-prob tensors, with no model involved.

    Tensor keywords are the fields of :class:`PairedLogps` (each ``(B,)``), or of :class:`GroupLogps` for
    objectives on other data shapes (KTO, DRO, NPO, Plackett-Luce, ...); ``state`` passes running statistics;
    every other keyword is one of that objective's parameters (or ``rpo_alpha``). Returns per-example
    ``losses`` and detached rewards. It runs the same ``ObjectivePlan`` the trainer runs.
    """
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
