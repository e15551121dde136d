"""What the trainer optimises: a primary objective, optional weighted extra objectives (a weighted sum as in
MPO, Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal LLMs via Mixed Preference
Optimization", Eq. 1) and the paired modifiers (``rpo_alpha``, ``ld_alpha``, ``wpo``).

An ``ObjectivePlan`` answers the same trait questions as an ``Objective`` (the union over its parts), so
the trainer keeps reading traits, never names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .base import GroupLogps, Objective, ObjectiveOutput, PairedLogps
from .compute import compute
from .modifiers import length_desensitized, with_rpo, wpo_weights
from .table import get_objective, make_params


@dataclass(frozen=True)
class Component:
    objective: Objective
    params: object
    weight: float = 1.0


@dataclass(frozen=True)
class ObjectivePlan:
    primary: Component
    extras: tuple[Component, ...] = ()
    rpo_alpha: float = 0.0
    ld_alpha: float | None = None
    wpo: bool = False
    _parts: tuple[Component, ...] = field(init=False, repr=False)

    def __post_init__(self):
        parts = (self.primary, *self.extras)
        object.__setattr__(self, "_parts", parts)
        shared = set(self.primary.objective.shapes)
        for part in self.extras:
            shared &= set(part.objective.shapes)
        if not shared:
            names = ", ".join(f"{p.objective.name} ({'/'.join(p.objective.shapes)})" for p in parts)
            raise ValueError(f"objectives in one mixture must train on a common data shape: {names}")
        if self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.rpo_alpha and "pairs" not in shared:
            raise ValueError(f"rpo_alpha adds a chosen-completion NLL to paired objectives; {self.name!r} is not one")
        if (self.ld_alpha is not None or self.wpo) and ("pairs" not in shared or not self.uses_rejected):
            raise ValueError(f"ld_alpha and wpo weigh a chosen against a rejected completion; {self.name!r} does not "
                             "compare two completions")

    # ---- traits: the union over the parts, plus what the modifiers need
    @property
    def name(self) -> str:
        return "+".join(p.objective.name for p in self._parts)

    @property
    def shapes(self) -> tuple[str, ...]:
        shared = [s for s in self.primary.objective.shapes if all(s in p.objective.shapes for p in self.extras)]
        return tuple(shared)

    @property
    def needs_reference(self) -> bool:
        return any(p.objective.needs_reference for p in self._parts)

    @property
    def needs_token_logps(self) -> bool:
        return self.ld_alpha is not None or self.wpo or any(p.objective.needs_token_logps for p in self._parts)

    @property
    def needs_token_kl(self) -> bool:
        return any(p.objective.needs_token_kl for p in self._parts)

    @property
    def needs_value(self) -> bool:
        return any(p.objective.needs_value for p in self._parts)

    @property
    def batch_level(self) -> bool:
        return any(p.objective.batch_level for p in self._parts)

    @property
    def uses_rejected(self) -> bool:
        return any(p.objective.uses_rejected for p in self._parts)

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for p in self._parts for r in p.objective.requires))

    @property
    def needs_live_reference(self) -> bool:
        reference_tokens = self.ld_alpha is not None and self.needs_reference
        return reference_tokens or any(p.objective.needs_live_reference for p in self._parts)

    # ---- the loss
    def compute(self, logps: PairedLogps | GroupLogps) -> ObjectiveOutput:
        if self.ld_alpha is not None:
            logps = length_desensitized(logps, self.ld_alpha)
        outputs = [compute(p.objective, logps, p.params) for p in self._parts]
        losses = sum(p.weight * out.losses for p, out in zip(self._parts, outputs, strict=True))
        metrics, state = dict(outputs[0].metrics), {}
        for part, out in zip(self._parts, outputs, strict=True):
            state.update(out.state)
            if self.extras:
                metrics[f"{part.objective.name}/loss"] = out.losses.mean().detach()
        if self.wpo:
            weights = wpo_weights(logps)
            losses = losses * weights
            metrics["wpo/weight"] = weights.mean()
        if self.rpo_alpha:
            losses, metrics["nll"] = with_rpo(losses, logps.upcast(), self.rpo_alpha)
        return dataclasses.replace(outputs[0], losses=losses, metrics=metrics, state=state)


def build_plan(name: str, params: dict, *, rpo_alpha: float = 0.0, ld_alpha: float | None = None,
               wpo: bool = False, weight: float = 1.0, mixture: list[dict] | None = None) -> ObjectivePlan:
    """The plan for a config's ``objective`` section; every part's parameters are checked here."""
    extras = []
    for i, entry in enumerate(mixture or []):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"mixture[{i}] must be a mapping with a 'name' (and optional 'weight' and parameters)")
        entry = dict(entry)
        part_name, part_weight = entry.pop("name"), float(entry.pop("weight", 1.0))
        extras.append(Component(get_objective(part_name), make_params(part_name, entry), part_weight))
    primary = Component(get_objective(name), make_params(name, params), weight)
    return ObjectivePlan(primary, tuple(extras), rpo_alpha=rpo_alpha, ld_alpha=ld_alpha, wpo=wpo)
