"""Model forward -> completion log-probs, without ever building the full ``[N, T, V]`` fp32 logits.

The backbone runs once over chosen and rejected rows together; only the hidden states at positions that
predict a completion token are projected to the vocabulary, in chunks, and each chunk's log-softmax runs
in fp32. Under autograd each chunk is checkpointed, so only its ``[C, H]`` input is kept for backward and
the ``[C, V]`` logits are recomputed there: peak memory is one chunk of logits, not the whole batch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class SequenceLogps:
    """Per-row sums over completion tokens. ``sums``/``counts`` are ``(N,)``; ``token_logps`` is ``(M,)`` with
    ``rows``/``cols`` ``(M,)`` giving each token's row and position (M = completion tokens in the batch)."""

    sums: Tensor
    counts: Tensor
    token_logps: Tensor
    rows: Tensor
    cols: Tensor


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone returning hidden states, LM head) of a Hugging Face causal LM, PEFT-wrapped or not."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel: LoRA layers live inside the base model's modules
        model = model.get_base_model()
    head = model.get_output_embeddings()
    backbone = model.base_model
    if head is None or backbone is model:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a separate output head")
    return backbone, head


def _logit_softcap(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    return getattr(config, "final_logit_softcapping", None) if config is not None else None


def _chunk_token_logps(head: nn.Module, hidden: Tensor, targets: Tensor, softcap: float | None) -> Tensor:
    """hidden ``(C, H)``, targets ``(C,)`` -> log p(target) ``(C,)`` in fp32."""
    logits = head(hidden).float()
    if softcap:  # Gemma-2 style final logit soft-capping, applied by the model's own forward too
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, chunk_size: int = 1024
) -> SequenceLogps:
    """Log-probs of the completion tokens of every row.

    input_ids, attention_mask ``(N, T)``; completion_mask ``(N, T)`` bool, True where a completion token sits.
    Token t is predicted from the hidden state at t-1, so position 0 is never scored.
    """
    backbone, head = split_causal_lm(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    predicts_completion = completion_mask[:, 1:]
    rows, cols = predicts_completion.nonzero(as_tuple=True)
    selected = hidden[:, :-1][rows, cols]  # (M, H): only positions whose next token is a completion token
    targets = input_ids[:, 1:][rows, cols]
    softcap = _logit_softcap(model.get_base_model() if hasattr(model, "get_base_model") else model)
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        h, y = selected[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_token_logps, head, h, y, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(head, h, y, softcap))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_logps)
    counts = predicts_completion.sum(dim=1)
    return SequenceLogps(sums=sums, counts=counts, token_logps=token_logps, rows=rows, cols=cols + 1)


class CompletionLogps(nn.Module):
    """Wraps a causal LM so one ``forward`` returns completion log-probs. Distributed wrappers (DDP, FSDP)
    wrap this module, so gradient synchronisation sees the whole computation."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> SequenceLogps:
        return completion_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size)
