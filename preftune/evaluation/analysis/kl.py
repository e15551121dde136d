"""Sequence KL(π‖π_ref) estimated from samples of π: the x-axis of the DPO paper's reward–KL frontier
(Rafailov et al. 2023, Figure 2).

KL(π‖π_ref) = E_{y~π(·|x)} [log π(y|x) - log π_ref(y|x)], so the mean over the samples of π in a
generations file of that log-ratio is an unbiased estimate (when the samples came from π itself: temperature
1, no top-p/top-k truncation; otherwise it estimates the KL of a different distribution, and the caller
warns). Each sample is scored as ``preftune generate`` produced it: the prompt rendered with the same
template choice (``sampling.encode_prompt``), then the completion's tokens, plus the EOS at which generation
stopped unless the completion used all of ``max_new_tokens`` (the decoded text no longer says which).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...feedback.sampling import encode_prompt
from ...training.logps import completion_logps


@dataclass
class SequenceKL:
    mean: float  # the estimate, in nats
    stderr: float  # standard error of the mean over samples
    samples: int
    log_ratios: list[float]  # per sample, in input order


def sample_ids(tokenizer, prompt, completion: str, use_template: bool, max_new_tokens: int | None) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one sample, tokenized the way it was generated."""
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if max_new_tokens is None or len(completion_ids) < max_new_tokens:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return encode_prompt(tokenizer, prompt, use_template), completion_ids


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask, completion_mask), each (N, T)."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    completion = torch.zeros((len(pairs), width), dtype=torch.bool)
    for row, (p, c) in enumerate(pairs):
        ids[row, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[row, : len(p) + len(c)] = 1
        completion[row, len(p) : len(p) + len(c)] = True
    return ids, attention, completion


@torch.no_grad()
def sequence_logps(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                   chunk_size: int = 1024) -> Tensor:
    """(N,) summed completion log-probs of every (prompt ids, completion ids) pair."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(pairs), batch_size):
        ids, attention, completion = collate(pairs[start : start + batch_size], pad_id)
        out.append(completion_logps(model, ids.to(device), attention.to(device), completion.to(device),
                                    chunk_size).sums.cpu().double())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def estimate_kl(policy: nn.Module, reference: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                batch_size: int = 8, chunk_size: int = 1024, progress=None, map_batches=None) -> SequenceKL:
    """Mean over samples of log π(y|x) - log π_ref(y|x); both models must share the tokenizer.
    ``map_batches(batches, fn)`` runs ``fn`` over the batches (default: here, in order); the processes of a
    launched job pass theirs to share them out (``feedback.shards``)."""
    batches = [pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)]

    def log_ratios(part) -> Tensor:
        ratios = (sequence_logps(policy, part, pad_id, batch_size, chunk_size)
                  - sequence_logps(reference, part, pad_id, batch_size, chunk_size))
        if progress is not None:
            progress(len(part))
        return ratios

    ratios = map_batches(batches, log_ratios) if map_batches else [log_ratios(part) for part in batches]
    values = torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64)
    n = values.numel()
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return SequenceKL(float(values.mean()) if n else math.nan, stderr, n, values.tolist())
