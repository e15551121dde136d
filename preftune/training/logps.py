"""Model forward -> completion log-probs, without ever building the full ``[N, T, V]`` fp32 logits.

The backbone runs once over all rows of a batch (chosen and rejected together); only the hidden states at
positions that predict a completion token are projected to the vocabulary, in chunks (of at most
``chunk_size`` positions and ``CHUNK_LOGITS`` logits), and each chunk's log-softmax runs in fp32. Under autograd each chunk is checkpointed, so only its ``[C, H]`` input is kept
for backward and the ``[C, V]`` logits are recomputed there: peak memory is one chunk of logits.

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
from torch.utils.weak import WeakIdKeyDictionary

from .packing import backbone_hidden, prompt_lengths


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
            hidden, where = _hidden(self.backbone, input_ids, attention_mask, completion_mask, self.packing)
            return hidden[where[rows, cols]]


def _hidden(backbone, input_ids, attention_mask, completion_mask, packing):
    """(hidden (L, H), where (N, T)) of every row; rows with the same prompt share its computation."""
    return backbone_hidden(backbone, input_ids, attention_mask, packing,
                           shared_prefix=prompt_lengths(completion_mask, attention_mask))


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
    hidden, where = _hidden(backbone, input_ids, attention_mask, completion_mask, packing)
    selected = hidden[where[rows, cols]]
    targets = input_ids[:, 1:][rows, cols]
    softcap = _logit_softcap(model)
    chunk_size = _even_chunks(selected.shape[0], max(1, min(chunk_size, CHUNK_LOGITS // _vocabulary(head))))
    stats, ref_tokens = (head_stats or head_statistics)(head, selected, targets, chunk_size, softcap, sum_sq,
                                                        reference, ref_selected)
    n_rows = input_ids.shape[0]
    out = SequenceLogps(
        sums=_row_sums(stats[:, 0], rows, n_rows), counts=predicts.sum(dim=1), token_logps=stats[:, 0],
        rows=rows, cols=cols + 1,
        token_log_sum_sq=stats[:, 1] if sum_sq else None,
        token_kl=stats[:, -1] if reference is not None else None,
    )
    if reference is not None:
        out.reference_token_logps = ref_tokens
        out.reference_sums = _row_sums(out.reference_token_logps, rows, n_rows)
    if prompt_hidden:
        last_prompt = completion_mask.float().argmax(dim=1) - 1  # the position predicting the first completion token
        out.prompt_hidden = hidden[where[torch.arange(n_rows, device=hidden.device), last_prompt.clamp(min=0)]]
    return out


def head_statistics(head: nn.Module, selected: Tensor, targets: Tensor, chunk_size: int, softcap: float | None,
                    sum_sq: bool, reference: TokenReference | None, ref_selected: Tensor | None
                    ) -> tuple[Tensor, Tensor | None]:
    """``(M, S)`` statistics of the scored positions (``_chunk_stats``), chunk by chunk, each chunk checkpointed
    under autograd; with ``reference``, its per-token log-probs ``(M,)`` too. A plain linear head asked for
    log-probs only goes through ``HeadLogprobs`` instead (the same values, far less memory traffic)."""
    linear = _linear_head(head, selected.device)
    if linear is not None and not (softcap or sum_sq or reference is not None):
        return HeadLogprobs.apply(selected, *linear, targets, chunk_size)[:, None], None
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


def _linear_head(head: nn.Module, device: torch.device) -> tuple[Tensor, Tensor | None, torch.dtype] | None:
    """``(weight, bias, dtype of the product)`` of a plain ``nn.Linear`` head; a frozen weight comes already
    cast to that dtype (the autocast dtype when autocast is on), once for all chunks. (Autocast casts a frozen
    weight again at every call: at every chunk, again when backward recomputes the chunk, and once more for
    the reference. SmolLM2's LM head is tied to its frozen 49,152 x 576 embedding: 16 casts of 113 MB in a
    forward and backward of 8 pairs with LoRA, 1.1 s of 9.5 s of operator time.) None for any other head:
    quantized, wrapped, or sharded by DeepSpeed ZeRO-3."""
    weight = getattr(head, "weight", None)
    if type(head) is not nn.Linear or type(weight) is not nn.Parameter or hasattr(weight, "ds_id"):
        return None
    bias = head.bias
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
    if not weight.requires_grad and (bias is None or not bias.requires_grad):
        weight, bias = frozen_cast(weight, dtype), None if bias is None else bias.to(dtype)
    return weight, bias, dtype


_FROZEN_CASTS = WeakIdKeyDictionary()


def frozen_cast(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight.to(dtype)`` for a frozen weight, made once and kept while the weight's storage and version are
    unchanged (an in-place update or a swapped ``.data`` makes a new one). A frozen head tied to the embedding
    stays fp32 for the embedding's lookups (``precision.store_frozen_linears_in_bf16``), so under bf16 every
    forward cast it again: 49,152 x 576 for SmolLM2, the policy's forward and the reference's, 20-80 ms each
    on a 2-core CPU (most of it faulting in the fresh 57 MB), for the price of keeping one bf16 copy. Not
    kept under inference mode (an inference tensor cannot be saved for a later backward). Sharded weights never
    come here: ``_linear_head`` passes by ZeRO-3's and FSDP2's (accelerate makes the head a unit of its own,
    whose class is no longer ``nn.Linear``; FSDP2 refills gathered weights without bumping their version)."""
    if weight.dtype == dtype:
        return weight
    if torch.is_inference_mode_enabled():
        return weight.to(dtype)
    key = (weight.data_ptr(), weight._version, dtype, weight.device)
    kept = _FROZEN_CASTS.get(weight)
    if kept is None or kept[0] != key:
        kept = _FROZEN_CASTS[weight] = (key, weight.detach().to(dtype))
    return kept[1]


def _chunk_head(head: nn.Module, device: torch.device) -> Callable[[Tensor], Tensor]:
    """What computes the chunks' logits in the general path: ``head`` itself or, for a frozen plain
    ``nn.Linear`` head, the product with its weight cast once (``_linear_head``). The product gets the operands
    autocast gives it, so the logits are the same."""
    linear = _linear_head(head, device)
    if linear is None or linear[0].requires_grad:
        return head
    return functools.partial(F.linear, weight=linear[0], bias=linear[1])


class HeadLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[target]`` at every position, chunk by chunk, in two buffers.

    The general path checkpoints each chunk and lets autograd differentiate it: each chunk allocates and
    fills its ``[C, V]`` logits, their fp32 copy and the log-softmax (twice, counting the recomputation), a
    zero gradient to scatter the targets' gradients into, the log-softmax backward's output and its cast back
    to the product's dtype: ten fresh ``[C, V]`` tensors. Here one ``[C, V]`` buffer in the product's dtype and
    one in fp32 serve every chunk: forward writes the logits, their fp32 copy and the log-softmax in place and
    keeps the targets' entries; backward recomputes them, turns the log-softmax into ``-g p`` in place, adds
    ``g`` at the targets (autograd's log-softmax backward, term for term) and multiplies by the weight for the
    hidden states' gradient and, for a trainable head, by the hidden states for the weight's (summed over
    chunks in fp32). Operands and roundings are autocast's: bf16 products, fp32 softmax. (SmolLM2-135M with
    LoRA, forward and backward of 8 rows: 10% less time, bitwise the same log-probs and gradients; a tiny
    Llama step in fp32, alternating runs: 23% less time with a 32k vocabulary, 5% with 8k.)"""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, targets: Tensor,
                chunk_size: int) -> Tensor:
        ctx.chunk_size = chunk_size
        with torch.autocast(hidden.device.type, enabled=False):  # the operands' dtypes are settled here
            inputs, product_weight = hidden.to(dtype), weight.to(dtype)
            product_bias = None if bias is None else bias.to(dtype)
            out = torch.empty(inputs.shape[0], dtype=torch.float32, device=inputs.device)
            for part, _, logprobs in _head_chunks(inputs, product_weight, product_bias, chunk_size):
                out[part] = logprobs.gather(1, targets[part, None]).squeeze(1)
        ctx.save_for_backward(inputs, product_weight, product_bias, targets)
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        inputs, weight, bias, targets = ctx.saved_tensors
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_inputs = torch.empty_like(inputs) if wants_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if wants_bias else None
        with torch.autocast(inputs.device.type, enabled=False):
            for part, logits, logprobs in _head_chunks(inputs, weight, bias, ctx.chunk_size):
                g = grad[part]
                probs = logprobs.exp_().mul_(-g[:, None])  # d log p_t / d logit_v = [v = t] - p_v
                probs[torch.arange(probs.shape[0], device=probs.device), targets[part]] += g
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
                product = probs if probs.dtype == logits.dtype else logits.copy_(probs)  # free buffer: reuse
                if grad_inputs is not None:
                    torch.mm(product, weight, out=grad_inputs[part])
                if grad_weight is not None and product.dtype == grad_weight.dtype:
                    grad_weight.addmm_(product.t(), inputs[part])
                elif grad_weight is not None:  # a bf16 product, summed over chunks in fp32
                    grad_weight += product.t().mm(inputs[part])
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return (None if grad_inputs is None else grad_inputs.to(hidden_dtype),
                None if grad_weight is None else grad_weight.to(weight_dtype),
                None if grad_bias is None else grad_bias.to(bias_dtype), None, None, None)


def _head_chunks(inputs: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int):
    """``(slice, logits, their fp32 log-softmax)`` for each chunk of ``inputs``, all in two buffers (one when
    the product is fp32: the log-softmax then overwrites the logits)."""
    n, vocabulary = inputs.shape[0], weight.shape[0]
    rows = min(chunk_size, n)
    logits = _workspace(rows, vocabulary, weight.dtype, inputs.device)
    logprobs = logits if weight.dtype == torch.float32 else _workspace(rows, vocabulary, torch.float32, inputs.device)
    for start in range(0, n, chunk_size):
        part = slice(start, min(start + chunk_size, n))
        size = part.stop - start
        torch.mm(inputs[part], weight.t(), out=logits[:size])
        if bias is not None:
            logits[:size] += bias
        if logprobs is not logits:
            logprobs[:size].copy_(logits[:size])
        yield part, logits[:size], torch.log_softmax(logprobs[:size], -1, out=logprobs[:size])


_WORKSPACES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _workspace(rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``[rows, columns]`` scratch tensor over memory kept for the next call (one per dtype and device, grown
    when too small, at most ``CHUNK_LOGITS`` fp32 entries for the log-prob chunks). ``HeadLogprobs`` needs two
    per call, three calls a step with a reference; fresh ones (up to 33 MB for SmolLM2's 49k vocabulary) came
    from the OS each time and each page faulted in on first write: 20 ms for the copy into one, against 1.3
    ms into memory already mapped (2-core CPU). Only for scratch that never leaves the call."""
    if torch.is_inference_mode_enabled():  # an inference tensor kept here could not be written outside it
        return torch.empty(rows, columns, dtype=dtype, device=device)
    key = dtype, torch.device(device)
    kept = _WORKSPACES.get(key)
    if kept is None or kept.numel() < rows * columns:
        kept = _WORKSPACES[key] = torch.empty(rows * columns, dtype=dtype, device=device)
    return kept[:rows * columns].view(rows, columns)


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
