"""One batch through policy, reference and objective — shared by training, evaluation and `preftune eval`.

From a model's per-row log-probs to an objective's named inputs (PairedLogps or GroupLogps): batches are
slot-major (``row_example``/``row_slot`` say which example and which completion each row is); pairs are rows
``[chosen_1..B, rejected_1..B]``; other shapes put completion k of example b at slot k.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import row_layout
from ..objectives import GroupLogps, ObjectiveOutput, PairedLogps, takes_groups
from ..objectives.plan import ObjectivePlan
from .logps import SequenceLogps, TokenReference
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
    # Several processes and a ``batch_level`` objective: a ``distributed.RowGather`` that assembles the
    # global micro-batch's inputs, so the objective sees what one process would see.
    gather: Callable | None = None

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
        if self.gather is None:
            return self.plan.compute(logps), logps
        rows = 0 if is_stand_in(batch) else logps.batch_size
        return self.gather.local(self.plan.compute(self.gather(logps, rows))), logps


def is_stand_in(batch: Batch) -> bool:
    """A batch a process runs only to keep collectives in step (``schedule.Shard``): nothing in it counts."""
    return bool(batch.get("stand_in", False))


@torch.no_grad()
def evaluate(scorer: Scorer, batches, model: torch.nn.Module, state: Mapping[str, Tensor] | None = None,
             prefix: str = "eval/") -> dict[str, float]:
    """Example-weighted metrics over every batch; the model is in eval mode meanwhile. Running objective
    statistics are read, never updated, by evaluation."""
    return {f"{prefix}{k}": v for k, v in evaluation_sums(scorer, batches, model, state).means().items()}


@torch.no_grad()
def evaluation_sums(scorer: Scorer, batches, model: torch.nn.Module,
                    state: Mapping[str, Tensor] | None = None) -> MeanAccumulator:
    """The sums and counts behind ``evaluate`` (one process's share, to be added across processes)."""
    was_training = model.training
    model.eval()
    acc = MeanAccumulator()
    try:
        for batch in batches:
            out, logps = scorer(batch, state)
            if not is_stand_in(batch):
                add_batch_statistics(acc, out, logps)
    finally:
        model.train(was_training)
    return acc


def _grid(values: Tensor, example: Tensor, slot: Tensor, shape: tuple[int, int], fill: float = 0.0) -> Tensor:
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    return out.index_put((example, slot), values)


def build_inputs(objective, batch: Batch, out: SequenceLogps, reference: Tensor | None,
                 state: Mapping[str, Tensor]) -> PairedLogps | GroupLogps:
    """``reference``: the reference's summed log-probs per row ``(N,)`` (None for reference-free)."""
    if takes_groups(objective):
        return _group_inputs(objective, batch, out, reference, state)
    return _paired_inputs(objective, batch, out, reference, state)


def _paired_inputs(objective, batch, out, reference, state) -> PairedLogps:
    half = batch["index"].shape[0]
    paired = out.sums.shape[0] == 2 * half
    fields: dict = {"policy_chosen_logps": out.sums[:half], "chosen_tokens": out.counts[:half], "state": state}
    if paired:
        fields.update(policy_rejected_logps=out.sums[half:], rejected_tokens=out.counts[half:])
    if reference is not None:
        fields["reference_chosen_logps"] = reference[:half]
        if paired:
            fields["reference_rejected_logps"] = reference[half:]
    if objective.needs_token_logps or objective.needs_token_kl:
        fields.update(_token_fields(out, half, paired, objective))
    return PairedLogps(**fields)


def _token_fields(out: SequenceLogps, half: int, paired: bool, objective) -> dict:
    policy, mask = out.padded(out.token_logps)
    sides = [("chosen", slice(0, half))] + ([("rejected", slice(half, 2 * half))] if paired else [])
    fields = {}
    for side, rows in sides:
        fields[f"{side}_token_mask"] = mask[rows]
        fields[f"policy_{side}_token_logps"] = policy[rows]
        if out.reference_token_logps is not None:
            fields[f"reference_{side}_token_logps"] = out.padded(out.reference_token_logps)[0][rows]
        if out.token_kl is not None and objective.needs_token_kl:
            fields[f"{side}_token_kl"] = out.padded(out.token_kl)[0][rows]
        if out.token_log_sum_sq is not None:
            fields[f"{side}_token_log_sum_sq"] = out.padded(out.token_log_sum_sq)[0][rows]
    return fields


def _group_inputs(objective, batch, out, reference, state) -> GroupLogps:
    example, slot, slots = row_layout(batch)
    n_examples = batch["index"].shape[0]
    kl_rows = "labels" in batch  # unpaired data: slot 1 holds the mismatched (prompt, completion) KL rows
    width = 1 if kl_rows else slots
    real = slot < width
    shape = (n_examples, width)
    fields = {
        "policy_logps": _grid(out.sums[real], example[real], slot[real], shape),
        "tokens": _grid(out.counts[real], example[real], slot[real], shape, fill=1),
        "mask": _grid(torch.ones_like(real[real]), example[real], slot[real], shape, fill=False),
        "state": state,
    }
    if reference is not None:
        fields["reference_logps"] = _grid(reference[real], example[real], slot[real], shape)
    if kl_rows:
        fields["labels"] = batch["labels"]
        if slots > 1:
            kl = ~real
            fields["policy_kl_logps"] = _grid(out.sums[kl], example[kl], slot[kl] - 1, (n_examples, 1))[:, 0]
            if reference is not None:
                fields["reference_kl_logps"] = _grid(reference[kl], example[kl], slot[kl] - 1, (n_examples, 1))[:, 0]
    if "scores" in batch:
        fields["scores"] = batch["scores"][:, :width]
    if out.values is not None:
        fields["values"] = _grid(out.values, example, slot, (n_examples, slots))[:, 0]
    return GroupLogps(**fields)
