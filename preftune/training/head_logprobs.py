"""The LM head of the log-prob path when it is a plain ``nn.Linear`` (``logps.head_statistics`` decides).

``HeadLogprobs`` computes ``log_softmax(hidden @ W.T + b)[target]`` chunk by chunk in two scratch buffers kept
from call to call, with a written-out backward that reads the forward's log-softmax when it was small enough
to keep (``KEPT_LOGITS``) and recomputes it otherwise; ``linear_head`` keeps the bf16 copy of a frozen head (SmolLM2's,
tied to its fp32 embedding) from step to step. Both exist for the same reason: fresh multi-megabyte tensors
come from the OS at each call and are faulted in page by page, which on a 2-core CPU cost more than the
arithmetic around them (a SmolLM2 LoRA bf16 step: 12% less time with both kept).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .precision import kept_cast


def linear_head(head: nn.Module, device: torch.device) -> tuple[Tensor, Tensor | None, torch.dtype] | None:
    """``(weight, bias, dtype of the product)`` of a plain ``nn.Linear`` head; a frozen weight comes already
    cast to that dtype (the autocast dtype when autocast is on), the copy kept (``precision.kept_cast``).
    (Autocast casts a frozen weight again at every call: at every chunk, again when backward recomputes the
    chunk, and once more for the reference. SmolLM2's LM head is tied to its frozen 49,152 x 576 embedding: 16
    casts of 113 MB in a forward and backward of 8 pairs with LoRA, 1.1 s of 9.5 s of operator time.) None for
    any other head: quantized, wrapped, or sharded by DeepSpeed ZeRO-3."""
    weight = getattr(head, "weight", None)
    if type(head) is not nn.Linear or type(weight) is not nn.Parameter or hasattr(weight, "ds_id"):
        return None
    bias = head.bias
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
    if not weight.requires_grad and (bias is None or not bias.requires_grad):
        weight, bias = kept_cast(weight, dtype), None if bias is None else bias.to(dtype)
    return weight, bias, dtype


class HeadLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[target]`` at every position, chunk by chunk, in two buffers.

    The general path checkpoints each chunk and lets autograd differentiate it: each chunk allocates and
    fills its ``[C, V]`` logits, their fp32 copy and the log-softmax (twice, counting the recomputation), a
    zero gradient to scatter the targets' gradients into, the log-softmax backward's output and its cast back
    to the product's dtype: ten fresh ``[C, V]`` tensors. Here one ``[C, V]`` buffer in the product's dtype and
    one in fp32 serve every chunk: forward writes the logits, their fp32 copy and the log-softmax in place and
    keeps the targets' entries; backward recomputes them (or, when the forward could keep its whole
    log-softmax, ``KEPT_LOGITS``, reads it: one product fewer), turns the log-softmax into ``-g p`` in place, adds
    ``g`` at the targets (autograd's log-softmax backward, term for term) and multiplies by the weight for the
    hidden states' gradient and, for a trainable head, by the hidden states for the weight's (summed over
    chunks in fp32). Operands and roundings are autocast's: bf16 products, fp32 softmax. (SmolLM2-135M with
    LoRA, forward and backward of 8 rows: 10% less time, bitwise the same log-probs and gradients; a tiny
    Llama step in fp32, alternating runs: 23% less time with a 32k vocabulary, 5% with 8k; the kept
    log-softmax, later: tiny-8k step 1.00-1.15 -> 0.84-0.90 s, 4 alternating pairs, 40-50 MB more memory.)"""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, targets: Tensor,
                chunk_size: int, grad_enabled: bool = False) -> Tensor:
        ctx.chunk_size = chunk_size
        with torch.autocast(hidden.device.type, enabled=False):  # the operands' dtypes are settled here
            inputs, product_weight = hidden.to(dtype), weight.to(dtype)
            product_bias = None if bias is None else bias.to(dtype)
            out = torch.empty(inputs.shape[0], dtype=torch.float32, device=inputs.device)
            # needs_input_grad says which inputs require grad even under no_grad: the caller says whether
            # autograd records this call (an evaluation forward of a trainable head does not)
            differentiated = grad_enabled and any(ctx.needs_input_grad[:3])
            ctx.kept, kept = _keep_for_backward(inputs.shape[0], weight.shape[0], inputs.device) \
                if differentiated else (None, None)
            for part, _, logprobs in _head_chunks(inputs, product_weight, product_bias, chunk_size, kept):
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
        kept = _kept_by(ctx.kept)
        with torch.autocast(inputs.device.type, enabled=False):
            chunks = (_head_chunks(inputs, weight, bias, ctx.chunk_size) if kept is None
                      else _kept_chunks(kept, ctx.chunk_size, weight.dtype))
            for part, logits, logprobs in chunks:
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
                None if grad_bias is None else grad_bias.to(bias_dtype), None, None, None, None)


def _head_chunks(inputs: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int, kept: Tensor | None = None):
    """``(slice, logits, their fp32 log-softmax)`` for each chunk of ``inputs``, all in two buffers (one when
    the product is fp32: the log-softmax then overwrites the logits). ``kept``: an ``[N, V]`` fp32 tensor that
    holds every chunk's log-softmax instead (for backward to read)."""
    n, vocabulary = inputs.shape[0], weight.shape[0]
    rows, fp32 = min(chunk_size, n), weight.dtype == torch.float32
    if kept is None:
        logits = _workspace(rows, vocabulary, weight.dtype, inputs.device)
        logprobs = logits if fp32 else _workspace(rows, vocabulary, torch.float32, inputs.device)
    else:  # each chunk's log-softmax in its own rows of kept; bf16 logits still pass through a bf16 buffer
        logprobs = kept
        logits = logprobs if fp32 else _workspace(rows, vocabulary, weight.dtype, inputs.device)
    for start in range(0, n, chunk_size):
        part = slice(start, min(start + chunk_size, n))
        size = part.stop - start
        chunk = logprobs[:size] if kept is None else logprobs[part]
        product = chunk if logits is logprobs else logits[:size]
        torch.mm(inputs[part], weight.t(), out=product)
        if bias is not None:
            product += bias
        if logits is not logprobs:
            chunk.copy_(product)
        yield part, product, torch.log_softmax(chunk, -1, out=chunk)


def _kept_chunks(kept: Tensor, chunk_size: int, dtype: torch.dtype):
    """The chunks of a log-softmax the forward kept (``_head_chunks``' triples), with a scratch buffer in the
    product's dtype for a bf16 product of each chunk's gradient."""
    n = kept.shape[0]
    scratch = None if dtype == torch.float32 else _workspace(min(chunk_size, n), kept.shape[1], dtype, kept.device)
    for start in range(0, n, chunk_size):
        part = slice(start, min(start + chunk_size, n))
        yield part, kept[part] if scratch is None else scratch[: part.stop - start], kept[part]


_WORKSPACES: dict[tuple, Tensor] = {}
# The forward of a call that will be differentiated keeps its whole log-softmax (not one chunk's) for its
# backward when it has at most this many entries (64 MB in fp32; a tiny Llama's 8 pairs with 8k vocabulary
# and 96-token completions: 1,552 x 8,192 = 12.7M): the backward then skips recomputing the logits, one [N, H]
# x [H, V] product of the head's five. Kept in memory that serves every such call, so the backward checks
# that no later differentiated forward wrote there since (``_kept_by``). Larger ones (a 32k vocabulary,
# SmolLM2's 49k) would cost more memory than the product saves time: they are recomputed chunk by chunk.
KEPT_LOGITS = 16 * 2**20
_KEPT = "kept log-softmax"
_kept_owner: list = [None]  # (token, [N, V] view) of the forward whose log-softmax the memory holds


def _keep_for_backward(rows: int, columns: int, device: torch.device) -> tuple[object, Tensor] | tuple[None, None]:
    """``(token, [rows, columns] fp32 tensor)`` in the kept-log-softmax memory, the token now its owner's; or
    ``(None, None)`` when that would take more than ``KEPT_LOGITS`` entries."""
    if rows * columns > KEPT_LOGITS:
        return None, None
    kept = _WORKSPACES.get(_KEPT)
    if kept is None or kept.numel() < rows * columns or kept.device != device:
        kept = _WORKSPACES[_KEPT] = torch.empty(rows * columns, dtype=torch.float32, device=device)
    token, view = object(), kept[: rows * columns].view(rows, columns)
    _kept_owner[0] = token, view
    return token, view


def _kept_by(token: object | None) -> Tensor | None:
    """The log-softmax the forward holding ``token`` kept, if nothing overwrote it since; claimed (the backward
    turns it into gradients in place)."""
    if token is None or _kept_owner[0] is None or _kept_owner[0][0] is not token:
        return None
    view = _kept_owner[0][1]
    _kept_owner[0] = None
    return view


def _workspace(rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``[rows, columns]`` scratch tensor over memory kept for the next call (one per dtype and device, grown
    when too small, at most ``logps.CHUNK_LOGITS`` fp32 entries for the log-prob chunks). ``HeadLogprobs`` needs two
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
