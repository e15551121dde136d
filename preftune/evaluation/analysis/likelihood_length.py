"""The SimPO analysis of held-out pairs (Meng et al. 2024, "SimPO", the length-normalisation analysis): how
strongly the policy's average log-likelihood per token follows completion length. DPO's reward (a summed log-ratio)
lets a model prefer long answers; SimPO's length-normalised reward should show a weak correlation.

``LikelihoodRecorder`` wraps the policy callable of `preftune eval` and keeps each batch's per-row sums and
token counts, so the analysis costs no extra forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .spearman import spearman


class LikelihoodRecorder:
    """Calls ``policy`` unchanged and records ``(sums, counts)`` of each batch on the CPU. With the pair
    collator a batch's rows are ``[chosen_1..B, rejected_1..B]``."""

    def __init__(self, policy: Callable):
        self.policy = policy
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, *args, **kwargs):
        out = self.policy(*args, **kwargs)
        self.batches.append((out.sums.detach().double().cpu(), out.counts.detach().double().cpu()))
        return out


def likelihood_length_metrics(batches: list[tuple[torch.Tensor, torch.Tensor]], prefix: str = "eval/analysis/"
                              ) -> dict[str, float]:
    """Spearman ρ between average log-likelihood (sum / tokens) and length (tokens) over every chosen and
    rejected completion, plus the mean lengths of each side."""
    if not batches:
        return {}
    sums = torch.cat([s for s, _ in batches])
    counts = torch.cat([c for _, c in batches])
    keep = counts > 0
    halves = [(s.shape[0] // 2, c) for s, c in batches]
    chosen_tokens = torch.cat([c[:half] for half, c in halves])
    rejected_tokens = torch.cat([c[half:] for half, c in halves])
    return {
        f"{prefix}avg_logp_length_spearman": spearman((sums[keep] / counts[keep]).tolist(), counts[keep].tolist()),
        f"{prefix}completions": float(keep.sum()),
        f"{prefix}tokens_chosen_mean": float(chosen_tokens.mean()),
        f"{prefix}tokens_rejected_mean": float(rejected_tokens.mean()),
    }
