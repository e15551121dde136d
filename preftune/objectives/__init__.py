"""The objectives table: name -> Objective (function, parameter type, traits). Explicit on purpose:
adding a variant means one file and one line here; nothing is discovered or registered by decorators."""

from __future__ import annotations

import dataclasses
import difflib

from torch import Tensor

from .base import Objective, ObjectiveOutput, PairedLogps
from .dpo import DPOParams, dpo_loss

OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(
        "dpo", dpo_loss, DPOParams, needs_reference=True,
        paper="Rafailov et al. 2023, Direct Preference Optimization (Eq. 7); cDPO with label_smoothing",
    ),
}

# A term any paired objective can add: α · mean-token NLL of the chosen completion
# (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 2 — RPO).
SHARED_PARAMS = ("rpo_alpha",)


def get_objective(name: str) -> Objective:
    """The table row for ``name``; an unknown name is an error that lists the valid ones."""
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, OBJECTIVES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown objective {name!r}{hint}; valid objectives: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def param_names(objective: Objective) -> list[str]:
    return [f.name for f in dataclasses.fields(objective.params)]


def make_params(name: str, values: dict) -> object:
    """Build ``name``'s typed parameters; a parameter it does not take is an error listing the ones it does."""
    objective = get_objective(name)
    allowed = param_names(objective)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(
            f"objective {name!r} does not take parameter(s) {', '.join(unknown)}; "
            f"its parameters are: {', '.join(allowed) or '(none)'}"
            + (f" (and {', '.join(SHARED_PARAMS)} for paired objectives)" if "pairs" in objective.shapes else "")
        )
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            kind = type(value).__name__
            default = next(f.default for f in dataclasses.fields(objective.params) if f.name == key)
            if not isinstance(value, type(default)):
                raise TypeError(f"objective {name!r}: parameter {key} expected {type(default).__name__}, got {kind}")
    return objective.params(**values)


def compute(objective: Objective, logps: PairedLogps, params: object, rpo_alpha: float = 0.0) -> ObjectiveOutput:
    """Check the inputs at the boundary, run the objective, add the optional RPO NLL term."""
    paired = logps.policy_rejected_logps is not None
    logps.check(objective.name, objective.needs_reference, needs_rejected=objective.uses_rejected and paired)
    out = objective.loss(logps, params)
    if rpo_alpha:
        if rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
        nll = logps.chosen_nll()
        out = dataclasses.replace(out, losses=out.losses + rpo_alpha * nll, metrics={**out.metrics, "nll": nll.mean().detach()})
    return out


def preference_loss(name: str, **kwargs: Tensor | float) -> ObjectiveOutput:
    """Compute objective ``name`` on log-prob tensors, with no model involved.

    Tensor keywords are the fields of :class:`PairedLogps` (each ``(B,)``); every other keyword is one of
    that objective's parameters (or ``rpo_alpha``). Returns per-example ``losses`` and detached rewards.
    """
    objective = get_objective(name)
    tensor_fields = {f.name for f in dataclasses.fields(PairedLogps)}
    tensors = {k: v for k, v in kwargs.items() if k in tensor_fields}
    values = {k: v for k, v in kwargs.items() if k not in tensor_fields}
    rpo_alpha = float(values.pop("rpo_alpha", 0.0))
    if "policy_chosen_logps" not in tensors or "chosen_tokens" not in tensors:
        raise ValueError(f"preference_loss({name!r}) needs policy_chosen_logps and chosen_tokens, each a (B,) tensor")
    params = make_params(name, values)
    return compute(objective, PairedLogps(**tensors), params, rpo_alpha=rpo_alpha)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "PairedLogps", "compute", "get_objective",
           "make_params", "param_names", "preference_loss"]
