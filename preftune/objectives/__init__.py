"""The objectives table: name -> Objective (function, parameter type, traits). Explicit on purpose:
adding a variant means one file and one line here; nothing is discovered or registered by decorators."""

from __future__ import annotations

import dataclasses
import difflib

from torch import Tensor

from .base import Objective, ObjectiveOutput, PairedLogps
from .cpo import CPOParams, cpo_loss
from .dpo import DPOParams, dpo_loss
from .hinge import HingeParams, hinge_loss
from .ipo import IPOParams, ipo_loss
from .orpo import ORPOParams, orpo_loss
from .robust import RobustParams, robust_loss
from .sft import SFTParams, sft_loss
from .simpo import SimPOParams, simpo_loss

OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(
        "dpo", dpo_loss, DPOParams, needs_reference=True,
        paper="Rafailov et al. 2023, Direct Preference Optimization (Eq. 7); cDPO with label_smoothing",
    ),
    "ipo": Objective(
        "ipo", ipo_loss, IPOParams, needs_reference=True,
        paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences (Eq. 17)",
    ),
    "robust": Objective(
        "robust", robust_loss, RobustParams, needs_reference=True,
        paper="Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy Feedback (Eq. 8)",
    ),
    "hinge": Objective(
        "hinge", hinge_loss, HingeParams, needs_reference=True,
        paper="Zhao et al. 2023, SLiC-HF (§2); Liu et al. 2024, Statistical Rejection Sampling Improves "
        "Preference Optimization (Eq. 7, hinge)",
    ),
    "simpo": Objective(
        "simpo", simpo_loss, SimPOParams, needs_reference=False,
        paper="Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward (Eq. 6)",
    ),
    "cpo": Objective(
        "cpo", cpo_loss, CPOParams, needs_reference=False,
        paper="Xu et al. 2024, Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance "
        "in Machine Translation (Eq. 3-4)",
    ),
    "orpo": Objective(
        "orpo", orpo_loss, ORPOParams, needs_reference=False,
        paper="Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model (Eq. 6-7)",
    ),
    "sft": Objective(
        "sft", sft_loss, SFTParams, needs_reference=False, shapes=("pairs", "completions"), uses_rejected=False,
        paper="Supervised fine-tuning (mean token NLL); the Preferred-FT baseline of Rafailov et al. 2023, "
        "Direct Preference Optimization (§6)",
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
    defaults = {f.name: f.default for f in dataclasses.fields(objective.params)}
    return objective.params(**{key: _coerce_param(name, key, v, defaults[key]) for key, v in values.items()})


def _coerce_param(objective: str, key: str, value: object, default: object) -> object:
    """``value`` as the type of ``default``; ints and numeric strings become floats where a float is expected
    (YAML 1.1 reads ``1e-1`` as a string); anything else of the wrong type (a bool included) is an error."""
    if default is dataclasses.MISSING:
        return value
    expected = type(default)
    if expected is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if isinstance(value, expected) and isinstance(value, bool) == (expected is bool):
        return value
    raise TypeError(
        f"objective {objective!r}: parameter {key} expects {expected.__name__}, got {value!r} ({type(value).__name__})"
    )


def compute(objective: Objective, logps: PairedLogps, params: object, rpo_alpha: float = 0.0) -> ObjectiveOutput:
    """Check the inputs at the boundary, run the objective in fp32 or better, add the optional RPO NLL term."""
    # An objective that uses the rejected completion must get it: missing tensors are a ValueError naming
    # the field here, not a TypeError from inside the formula.
    logps.check(objective.name, objective.needs_reference, needs_rejected=objective.uses_rejected)
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    logps = logps.upcast()
    out = objective.loss(logps, params)
    if rpo_alpha:
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
