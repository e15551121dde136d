"""One batch through policy, reference and objective — shared by training, evaluation and `preftune eval`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .inputs import build_inputs
from .logps import TokenReference
from .metrics import MeanAccumulator, add_batch_statistics
from .objectives import GroupLogps, Objective, ObjectiveOutput, PairedLogps, compute

Batch = dict[str, Tensor]


@dataclass
class Scorer:
    """Everything needed to turn a collated batch into an objective's output."""

    policy: Callable  # CompletionLogps (possibly wrapped by accelerate): rows -> SequenceLogps
    reference: Callable | None  # batch -> (N,) summed reference log-probs, or None
    objective: Objective
    params: object
    rpo_alpha: float = 0.0
    # Token-level objectives see the reference position by position, inside the policy's forward.
    token_reference: TokenReference | None = None
    modifiers: Mapping[str, float] = field(default_factory=dict)

    def __call__(self, batch: Batch, state: Mapping[str, Tensor] | None = None
                 ) -> tuple[ObjectiveOutput, PairedLogps | GroupLogps]:
        out = self.policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                          sum_sq=bool(self.modifiers.get("wpo")), reference=self.token_reference)
        if self.token_reference is not None:
            reference = out.reference_sums
        else:
            reference = self.reference(batch) if self.reference is not None else None
        logps = build_inputs(self.objective, batch, out, reference, state or {})
        result = compute(self.objective, logps, self.params, self.rpo_alpha)
        return result, logps


@torch.no_grad()
def evaluate(scorer: Scorer, batches, model: torch.nn.Module, state: Mapping[str, Tensor] | None = None,
             prefix: str = "eval/") -> dict[str, float]:
    """Example-weighted metrics over every batch; the model is in eval mode meanwhile. Running objective
    statistics are read, never updated, by evaluation."""
    was_training = model.training
    model.eval()
    acc = MeanAccumulator()
    try:
        for batch in batches:
            out, logps = scorer(batch, state)
            add_batch_statistics(acc, out, logps)
    finally:
        model.train(was_training)
    return {f"{prefix}{k}": v for k, v in acc.means().items()}
