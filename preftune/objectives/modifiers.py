"""Modifiers that apply to any paired objective, each a pure function of ``PairedLogps``.

- ``rpo_alpha`` (RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 2): adds
  α · the mean-token NLL of the chosen completion to each pair's loss.

- ``ld_alpha`` (LD-DPO, Liu et al. 2024, "LD-DPO: Length Desensitization in Direct Preference
  Optimization", Eq. 9): the tokens past the shorter completion's length count with weight α in the
  policy's and the reference's log-probs, damping DPO's preference for longer answers.
- ``wpo`` (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 5 with the
  sampling-aligned token weights of §3.2): each pair's loss is weighted by how likely the current policy is
  to generate both completions, w = min(1, exp(w̄(y_w) + w̄(y_l))) with w̄(y) the mean over tokens of
  log π(y_t) - log Σ_v π(v)², detached.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .base import PairedLogps


def _shared_and_tail(token_logps: Tensor, mask: Tensor, shared: Tensor) -> tuple[Tensor, Tensor]:
    """Sums of per-token log-probs ``(B, T)`` over the first ``shared (B,)`` completion tokens and after."""
    position = torch.arange(token_logps.shape[1], device=token_logps.device)[None, :]
    head = (position < shared[:, None]) & mask
    return (token_logps * head).sum(-1), (token_logps * (mask & ~head)).sum(-1)


def length_desensitized(logps: PairedLogps, alpha: float) -> PairedLogps:
    """LD-DPO Eq. 9: log π̂(y) = Σ_{t ≤ l_p} log π(y_t) + α Σ_{t > l_p} log π(y_t), l_p = min(|y_w|, |y_l|),
    for policy and reference alike; the token counts are left as they are."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {alpha}")
    shared = torch.minimum(logps.chosen_tokens, logps.rejected_tokens)
    changes = {}
    for who in ("policy", "reference"):
        for side in ("chosen", "rejected"):
            tokens = getattr(logps, f"{who}_{side}_token_logps")
            if tokens is None:
                if who == "reference" and logps.reference_chosen_logps is None:
                    continue
                raise ValueError(f"ld_alpha needs {who}_{side}_token_logps (per-token log-probs)")
            head, tail = _shared_and_tail(tokens, getattr(logps, f"{side}_token_mask"), shared)
            changes[f"{who}_{side}_logps"] = head + alpha * tail
    return replace(logps, **changes)


def wpo_weights(logps: PairedLogps) -> Tensor:
    """``(B,)`` detached weights in (0, 1] from per-token log-probs and ``log Σ_v π(v)²`` ``(B, T)``."""
    means = []
    for side in ("chosen", "rejected"):
        mask = getattr(logps, f"{side}_token_mask")
        adjusted = getattr(logps, f"policy_{side}_token_logps") - getattr(logps, f"{side}_token_log_sum_sq")
        means.append((adjusted * mask).sum(-1) / mask.sum(-1).clamp(min=1))
    return torch.exp(means[0] + means[1]).clamp(max=1.0).detach()


def with_rpo(losses: Tensor, logps: PairedLogps, alpha: float) -> tuple[Tensor, Tensor]:
    """RPO (Pang et al. 2024, Eq. 2): ``losses (B,)`` + α · NLL(y_w)/|y_w| per pair; also the detached mean NLL."""
    nll = logps.chosen_nll()
    return losses + alpha * nll, nll.mean().detach()
