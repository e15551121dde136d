"""The LM head of the log-prob path when it is a plain ``nn.Linear`` (``logps.head_statistics`` decides).

``HeadLogprobs`` computes ``log_softmax(hidden @ W.T + b)[target]`` chunk by chunk in two scratch buffers kept
from call to call, with a written-out backward; ``linear_head`` keeps the bf16 copy of a frozen head (SmolLM2's,
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
