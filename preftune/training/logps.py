"""Model forward -> completion log-probs, without ever building the full ``[N, T, V]`` fp32 logits.

The backbone runs once over all rows of a batch (chosen and rejected together); only the hidden states at
positions that predict a completion token are projected to the vocabulary, in chunks (of at most
``chunk_size`` positions and ``CHUNK_LOGITS`` logits), and each chunk's log-softmax runs in fp32. Under autograd each chunk is checkpointed, so only its ``[C, H]`` input is kept
for backward and the ``[C, V]`` logits are recomputed there: peak memory is one chunk of logits. The
backbone's last layer computes only those positions (``packing``: its other rows would feed nothing).

Token-level objectives ask for more per position, computed in the same chunks: ``log Σ_v p_v²`` (WPO
weights) and, given a live reference, ``KL(π_ref ‖ π_θ)`` over the vocabulary (TDPO).

Prefix sharing and padding-free batches (``packing``, default ``prefix_shared``): the backbone sees the
batch as one packed sequence without padding in which each prompt appears once, followed by each of its
completions; attention runs per prompt group with a tree mask (every completion sees the prompt and itself,
never its sibling) and position ids that continue the prompt's. We chose this over a shared KV cache because
it is one forward, so the linear layers (nearly all the FLOPs) see the batch's real tokens in one matrix
product, and gradients reach the shared prompt from every completion through plain autograd, with gradient
checkpointing, LoRA and any number of completions per prompt (pairs, KTO's mismatched rows, ranked lists)
unchanged; a cache would need two passes, a copy of the cache per completion and padding in each pass. The
selected positions are read back in the padded batch's row-major order, so everything downstream, per-token
objectives (TDPO, WPO, LD-DPO) included, sees exactly what the padded path gives (to float rounding). A model
whose attention cannot be swapped (not sdpa through transformers' attention interface, soft-capped logits)
or a batch that is not right-padded runs padded; ``packing: padded`` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .head_logprobs import HeadLogprobs, linear_head
from .packing import backbone_hidden, prompt_lengths

# Raised whenever the log-probs computed here change, even in their last bits (how positions are chunked, which
# rows a layer computes): reference log-probs cached by another revision are then not reused (``reference``).
# Before training, the policy is the reference, and its log-probs must equal the cached ones bit for bit.
LOGPS_REVISION = 2


@dataclass
class SequenceLogps:
    """Per-row sums over completion tokens: ``sums``/``counts`` ``(N,)``. Per token (M = completion tokens of
    the batch, row-major): ``token_logps``, ``rows``, ``cols`` ``(M,)``; optional ``token_log_sum_sq``,
    ``token_kl``, ``reference_token_logps`` ``(M,)`` and ``reference_sums`` ``(N,)``; ``prompt_hidden``
    ``(N, H)``, the last hidden state before each completion (for value heads)."""

    sums: Tensor
    counts: Tensor
    token_logps: Tensor
    rows: Tensor
    cols: Tensor
    token_log_sum_sq: Tensor | None = None
    token_kl: Tensor | None = None
    reference_token_logps: Tensor | None = None
    reference_sums: Tensor | None = None
    prompt_hidden: Tensor | None = None
    values: Tensor | None = None  # (N,) value-head estimates V(x), when the wrapper has a value head

    def padded(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token ``values (M,)`` -> ``(N, T)`` left-aligned (column j = j-th completion token) + mask."""
        n_rows = self.counts.shape[0]
        width = int(self.counts.max()) if n_rows else 0
        starts = torch.cumsum(self.counts, 0) - self.counts
        position = torch.arange(values.shape[0], device=values.device) - starts[self.rows]
        out = values.new_zeros(n_rows, width)
        mask = torch.zeros(n_rows, width, dtype=torch.bool, device=values.device)
        out[self.rows, position] = values
        mask[self.rows, position] = True
        return out, mask


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone returning hidden states, LM head) of a Hugging Face causal LM, PEFT-wrapped or not."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel: LoRA layers live inside the base model's modules
        model = model.get_base_model()
    head = model.get_output_embeddings()
    backbone = model.base_model
    if head is None or backbone is model:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a separate output head")
    return backbone, head


# At most this many fp32 logits per chunk (32 MB): a large vocabulary gets shorter chunks, so the few
# [C, V] tensors alive at once (logits, log-softmax, their gradient) stay ~100 MB whatever V is.
CHUNK_LOGITS = 8 * 2**20


def _even_chunks(n: int, most: int) -> int:
    """The chunk size that splits ``n`` positions into as few chunks of at most ``most`` as possible, all about
    equally long: 351 positions in chunks of at most 170 become 117 + 117 + 117, not 170 + 170 + 11 (a product
    with 11 rows runs at a third of the rate of one with 117; SmolLM2's head, 49,152 x 576)."""
    if n <= most:
        return max(n, 1)
    pieces = -(-n // most)
    return -(-n // pieces)


def _vocabulary(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    return getattr(weight, "ds_shape", weight.shape)[0] if weight is not None else 1  # ZeRO-3: its whole shape


def _logit_softcap(model: nn.Module) -> float | None:
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None)


def _logits(head: nn.Module, hidden: Tensor, softcap: float | None) -> Tensor:
    logits = head(hidden).float()
    if softcap:  # Gemma-2 style final logit soft-capping, applied by the model's own forward too
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _chunk_stats(head, hidden, targets, softcap, want_sum_sq: bool, ref_logprobs: Tensor | None) -> Tensor:
    """``(C, S)``: column 0 log p(target); then log Σ p² (if asked); then KL(π_ref ‖ π_θ) (if a reference)."""
    logits = _logits(head, hidden, softcap)
    logprobs = logits.log_softmax(dim=-1)
    stats = [logprobs.gather(-1, targets[:, None]).squeeze(-1)]
    if want_sum_sq:
        stats.append(torch.logsumexp(2 * logprobs, dim=-1))
    if ref_logprobs is not None:  # TDPO (Zeng et al. 2024, Eq. 13): sequential KL at each position
        stats.append((ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1))
    return torch.stack(stats, dim=-1)


class TokenReference:
    """A frozen reference seen token by token: its hidden states at the scored positions and its LM head.
    ``disable`` is a context manager factory for references that are the policy with adapters off."""

    def __init__(self, model: nn.Module, disable=None, packing: str = "prefix_shared"):
        self.model, self.disable, self.packing = model, disable, packing
        self.backbone, head = split_causal_lm(model)
        self.head = getattr(head, "base_layer", head)  # a LoRA-wrapped head without its adapter
        self.softcap = _logit_softcap(model)

    @torch.no_grad()
    def selected_hidden(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, rows: Tensor,
                        cols: Tensor) -> Tensor:
        with self.disable() if self.disable else contextlib.nullcontext():
            hidden, where = _hidden(self.backbone, input_ids, attention_mask, completion_mask, self.packing,
                                    (rows, cols))
            return hidden[where[rows, cols]]


def _hidden(backbone, input_ids, attention_mask, completion_mask, packing, read: tuple[Tensor, Tensor]):
    """(hidden (L, H), where (N, T)) of every row; rows with the same prompt share its computation. Only the
    states at the ``read`` (rows, cols) positions are computed to the end (``backbone_hidden``)."""
    return backbone_hidden(backbone, input_ids, attention_mask, packing,
                           shared_prefix=prompt_lengths(completion_mask, attention_mask), read=read)


def completion_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, chunk_size: int = 1024,
    *, sum_sq: bool = False, reference: TokenReference | None = None, prompt_hidden: bool = False,
    packing: str = "prefix_shared", head_stats: nn.Module | None = None,
) -> SequenceLogps:
    """Log-probs of the completion tokens of every row.

    input_ids, attention_mask ``(N, T)``; completion_mask ``(N, T)`` bool, True where a completion token sits.
    Token t is predicted from the hidden state at t-1, so position 0 is never scored. With ``reference``
    (a frozen model sharing the tokenizer) its log-probs and the per-token KL are computed too. ``packing``
    (``prefix_shared``, ``padding_free``, ``padded``) is how the rows go through the backbone (``packing``
    module); every mode gives the same log-probs. ``head_stats``: a ``HeadStatistics`` module to run the LM head
    through (``CompletionLogps`` has one), else ``head_statistics`` is called directly.
    """
    backbone, head = split_causal_lm(model)
    predicts = completion_mask[:, 1:]
    rows, cols = predicts.nonzero(as_tuple=True)  # position cols predicts token cols + 1
    # reference first: a reference that swaps weights into the policy must be done before autograd saves them
    ref_selected = None
    if reference is not None:
        ref_selected = reference.selected_hidden(input_ids, attention_mask, completion_mask, rows, cols)
    n_rows = input_ids.shape[0]
    last_prompt = None
    read_rows, read_cols = rows, cols
    if prompt_hidden:  # the position predicting the first completion token
        last_prompt = (completion_mask.float().argmax(dim=1) - 1).clamp(min=0)
        read_rows = torch.cat([rows, torch.arange(n_rows, device=rows.device)])
        read_cols = torch.cat([cols, last_prompt])
    hidden, where = _hidden(backbone, input_ids, attention_mask, completion_mask, packing, (read_rows, read_cols))
    selected = hidden[where[rows, cols]]
    targets = input_ids[:, 1:][rows, cols]
    softcap = _logit_softcap(model)
    chunk_size = _even_chunks(selected.shape[0], max(1, min(chunk_size, CHUNK_LOGITS // _vocabulary(head))))
    stats, ref_tokens = (head_stats or head_statistics)(head, selected, targets, chunk_size, softcap, sum_sq,
                                                        reference, ref_selected)
    out = SequenceLogps(
        sums=_row_sums(stats[:, 0], rows, n_rows), counts=predicts.sum(dim=1), token_logps=stats[:, 0],
        rows=rows, cols=cols + 1,
        token_log_sum_sq=stats[:, 1] if sum_sq else None,
        token_kl=stats[:, -1] if reference is not None else None,
    )
    if reference is not None:
        out.reference_token_logps = ref_tokens
        out.reference_sums = _row_sums(out.reference_token_logps, rows, n_rows)
    if last_prompt is not None:
        out.prompt_hidden = hidden[where[torch.arange(n_rows, device=hidden.device), last_prompt]]
    return out


def head_statistics(head: nn.Module, selected: Tensor, targets: Tensor, chunk_size: int, softcap: float | None,
                    sum_sq: bool, reference: TokenReference | None, ref_selected: Tensor | None
                    ) -> tuple[Tensor, Tensor | None]:
    """``(M, S)`` statistics of the scored positions (``_chunk_stats``), chunk by chunk, each chunk checkpointed
    under autograd; with ``reference``, its per-token log-probs ``(M,)`` too. A plain linear head asked for
    log-probs only goes through ``HeadLogprobs`` instead (the same values, far less memory traffic)."""
    linear = linear_head(head, selected.device)
    if linear is not None and not (softcap or sum_sq or reference is not None):
        return HeadLogprobs.apply(selected, *linear, targets, chunk_size, torch.is_grad_enabled())[:, None], None
    pieces, ref_pieces = [], []
    head = _chunk_head(head, selected.device)
    ref_head = _chunk_head(reference.head, selected.device) if ref_selected is not None else None
    for start in range(0, selected.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        ref_logprobs = None
        if ref_selected is not None:
            with torch.no_grad():
                ref_logprobs = _logits(ref_head, ref_selected[part], reference.softcap).log_softmax(-1)
            ref_pieces.append(ref_logprobs.gather(-1, targets[part, None]).squeeze(-1))
        args = (head, selected[part], targets[part], softcap, sum_sq, ref_logprobs)
        if torch.is_grad_enabled() and selected.requires_grad:
            pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_stats(*args))
    width = 1 + sum_sq + (reference is not None)
    stats = torch.cat(pieces) if pieces else selected.new_zeros(0, width, dtype=torch.float32)
    if reference is None:
        return stats, None
    return stats, torch.cat(ref_pieces) if ref_pieces else stats.new_zeros(0)


def _chunk_head(head: nn.Module, device: torch.device) -> Callable[[Tensor], Tensor]:
    """What computes the chunks' logits in the general path: ``head`` itself or, for a frozen plain
    ``nn.Linear`` head, the product with its weight cast once (``linear_head``). The product gets the operands
    autocast gives it, so the logits are the same."""
    linear = linear_head(head, device)
    if linear is None or linear[0].requires_grad:
        return head
    return functools.partial(F.linear, weight=linear[0], bias=linear[1])


class HeadStatistics(nn.Module):
    """``head_statistics`` as a module of the wrapped model, so that engines that hook modules see the LM head's
    chunks as one unit with plain tensor outputs. DeepSpeed ZeRO-3 needs it: it keeps a frozen head's gathered
    weight through a chunk's recomputation (the checkpoint) only while the backward of an enclosing module is
    running, and it cannot see into ``SequenceLogps``, the wrapper's own output."""

    def forward(self, head, selected, targets, chunk_size, softcap, sum_sq, reference, ref_selected):
        return head_statistics(head, selected, targets, chunk_size, softcap, sum_sq, reference, ref_selected)


def _row_sums(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    return torch.zeros(n_rows, dtype=torch.float32, device=values.device).index_add(0, rows, values)


class CompletionLogps(nn.Module):
    """Wraps a causal LM (and an optional value head) so one ``forward`` returns completion log-probs.
    Distributed wrappers (DDP, FSDP) wrap this module, so gradient synchronisation sees all of it."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024, value_head: nn.Module | None = None,
                 packing: str = "prefix_shared"):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.value_head = value_head
        self.packing = packing
        self.head_stats = HeadStatistics()

    # What accelerate's FSDP2 preparation looks up on the module it shards, so that the embedding and the
    # final norm + LM head become units of their own, as they do for a bare Hugging Face model. The root then
    # holds none of the model's weights, and the parts called directly (the backbone and head of the log-prob
    # path, the policy with adapters off as the reference, the sampler) gather their own weights.
    base_model_prefix = "backbone"

    @property
    def _no_split_modules(self) -> list[str] | None:  # the decoder layer class: one unit per layer
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return getattr(model, "_no_split_modules", None)

    @property
    def backbone(self) -> nn.Module:
        return split_causal_lm(self.model)[0]

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return split_causal_lm(self.model)[1]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, *, sum_sq: bool = False,
                reference: TokenReference | None = None) -> SequenceLogps:
        out = completion_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size,
                               sum_sq=sum_sq, reference=reference, prompt_hidden=self.value_head is not None,
                               packing=self.packing, head_stats=self.head_stats)
        if self.value_head is not None:
            # V(x) reads the policy's features without pushing the value loss into the policy (DRO trains
            # policy and value with separate gradients, Richemond et al. 2024, Eq. 10)
            out.values = self.value_head(out.prompt_hidden.detach().float()).squeeze(-1)
        return out
