"""One batch through policy, reference and objective — shared by training, evaluation and `preftune eval`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .metrics import MeanAccumulator, add_batch_statistics
from .objectives import Objective, ObjectiveOutput, PairedLogps, compute

Batch = dict[str, Tensor]


@dataclass
class Scorer:
    """Everything needed to turn a collated batch into an objective's output."""

    policy: Callable  # (input_ids, attention_mask, completion_mask) -> SequenceLogps
    reference: Callable | None  # batch -> (N,) summed reference log-probs, or None
    objective: Objective
    params: object
    rpo_alpha: float = 0.0

    def __call__(self, batch: Batch) -> tuple[ObjectiveOutput, PairedLogps]:
        out = self.policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        paired = batch["input_ids"].shape[0] == 2 * batch["index"].shape[0]
        reference = self.reference(batch) if self.reference is not None else None
        logps = split_rows(out.sums, out.counts, reference, paired)
        return compute(self.objective, logps, self.params, self.rpo_alpha), logps


def split_rows(sums: Tensor, counts: Tensor, reference: Tensor | None, paired: bool) -> PairedLogps:
    """Rows ``[chosen_1..B, rejected_1..B]`` (or ``[completion_1..B]``) -> the objective's named inputs."""
    if not paired:
        return PairedLogps(policy_chosen_logps=sums, chosen_tokens=counts,
                           reference_chosen_logps=reference)
    half = sums.shape[0] // 2
    ref_c, ref_r = (reference[:half], reference[half:]) if reference is not None else (None, None)
    return PairedLogps(
        policy_chosen_logps=sums[:half], policy_rejected_logps=sums[half:],
        chosen_tokens=counts[:half], rejected_tokens=counts[half:],
        reference_chosen_logps=ref_c, reference_rejected_logps=ref_r,
    )


@torch.no_grad()
def evaluate(scorer: Scorer, batches, model: torch.nn.Module, prefix: str = "eval/") -> dict[str, float]:
    """Example-weighted metrics over every batch; the model is in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    acc = MeanAccumulator()
    try:
        for batch in batches:
            out, logps = scorer(batch)
            add_batch_statistics(acc, out, logps)
    finally:
        model.train(was_training)
    return {f"{prefix}{k}": v for k, v in acc.means().items()}
