"""One batch through policy, reference and objective — shared by training, evaluation and `preftune eval`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..objectives import GroupLogps, ObjectiveOutput, PairedLogps
from ..objectives.plan import ObjectivePlan
from .inputs import build_inputs
from .logps import TokenReference
from .metrics import MeanAccumulator, add_batch_statistics

Batch = dict[str, Tensor]


@dataclass
class Scorer:
    """Everything needed to turn a collated batch into an objective's output."""

    policy: Callable  # CompletionLogps (possibly wrapped by accelerate): rows -> SequenceLogps
    reference: Callable | None  # batch -> (N,) summed reference log-probs, or None
    plan: ObjectivePlan
    # Token-level objectives see the reference position by position, inside the policy's forward.
    token_reference: TokenReference | None = None

    def __call__(self, batch: Batch, state: Mapping[str, Tensor] | None = None
                 ) -> tuple[ObjectiveOutput, PairedLogps | GroupLogps]:
        # The reference runs first: a TR-DPO LoRA reference swaps adapter weights in place, which must not
        # happen between the policy's forward and its backward.
        reference = None
        if self.token_reference is None and self.reference is not None:
            reference = self.reference(batch)
        out = self.policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                          sum_sq=self.plan.wpo, reference=self.token_reference)
        if self.token_reference is not None:
            reference = out.reference_sums
        logps = build_inputs(self.plan, batch, out, reference, state or {})
        return self.plan.compute(logps), logps


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
