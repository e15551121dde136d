"""Batched decoding for the Hugging Face backend: what ``model.generate`` computes, with less work per token.

- Each prompt is prefilled once, whatever the number of samples K: its KV cache is then repeated K times
  (``generate(num_return_sequences=K)`` prefills K copies).
- The KV cache is preallocated for the whole decode and written in place (``PreallocatedLayer``), where
  transformers' dynamic cache concatenates, copying every layer's whole cache, at every token.
- A row that has produced a stop token leaves the batch: the cache keeps only the unfinished rows, so the
  last long completion no longer drags the finished ones through every layer (``generate`` keeps computing
  them and pads).
- The per-token loop is a plain tensor loop: no logits processors, stopping criteria or output objects.
- On a CPU a wide LM head (a vocabulary of tens of thousands) is multiplied in slices of ``HEAD_CHUNK``
  output rows (``chunked_head``): the same dot products, each slice's weights staying in cache. With 32 rows
  decoding SmolLM2's 49,152 x 576 head this measured 1.4-1.6x faster than one product (the head is a fifth
  of a decode step's matmul work there). A linear fed at most ``NARROW_ROWS`` rows (the tail of a decode,
  once most rows have stopped) computes ``(W @ xᵀ)ᵀ`` (``narrow_linears``): a step that reads every weight
  for a handful of rows is bound by how fast the weights stream through the product.
- A token is drawn by inverting its row's cumulative distribution at one uniform number, searched block by
  block (``draw``), where ``torch.multinomial`` draws an exponential variate for every vocabulary entry.

Greedy decoding gives ``generate``'s tokens (a row's tokens depend only on its own prompt under a causal
mask; tests check it token for token). Sampling draws from a ``torch.Generator`` seeded per batch by the
caller, so a batch's samples are a pure function of its prompts, the settings and the seed: resumable
batch by batch. Temperature, top-k and top-p filter the logits as transformers' warpers do (temperature,
then top-k, then top-p, keeping at least one token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in a buffer sized for the whole decode; ``batch_select_indices`` drops rows."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        rows, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty(rows, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_empty(rows, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions is full; this is a bug in the decode loop")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)


@dataclass
class DecodeSettings:
    max_new_tokens: int
    stop_ids: list[int]
    pad_id: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0


def filter_logits(logits: Tensor, settings: DecodeSettings) -> Tensor:
    """(R, V) fp32 logits -> logits with the tokens that cannot be drawn set to -inf (temperature, then
    top-k, then top-p over the sorted probabilities, always keeping the most likely token)."""
    logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - settings.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


DRAW_BLOCK = 256  # vocabulary entries per block of ``draw``'s two-level search


def draw(probs: Tensor, points: Tensor) -> Tensor:
    """One index per row of ``probs`` (R, V), drawn with probability ``probs[r, v]``, by inverting each row's
    cumulative distribution (in float64) at ``points[r]``, a uniform number in [0, 1).

    The search has two levels: the block of ``DRAW_BLOCK`` entries holding the point (cumulative sums of the
    block totals), then the entry inside that block. It picks the entry one cumulative sum over the whole row
    picks (up to the rounding of float64 sums of the same terms taken in another order), with the float64
    conversion and cumulative sum of one block per row instead of the whole vocabulary:
    for 32 rows over SmolLM2's 49,152 tokens, 1.2 ms against 18 ms. (``torch.multinomial`` draws an
    exponential variate for every entry: 47 ms.) An entry of probability 0 is never drawn: the point is kept
    below each level's total, so it falls in a block, then an entry, whose cumulative sum grows there."""
    rows, width = probs.shape
    padded = (F.pad(probs, (0, (-width) % DRAW_BLOCK)) if width % DRAW_BLOCK else probs).reshape(rows, -1, DRAW_BLOCK)
    totals = padded.sum(-1, dtype=torch.float64)
    ends = totals.cumsum(-1)
    target = points[:, None].to(ends) * ends[:, -1:]
    target = torch.minimum(target, torch.nextafter(ends[:, -1:], torch.zeros_like(target)))
    block = torch.searchsorted(ends, target, right=True)
    within = target - F.pad(ends, (1, 0)).gather(1, block)  # minus the cumulative sum before the block
    inner = padded[torch.arange(rows, device=probs.device), block.squeeze(1)].double().cumsum(-1)
    within = torch.minimum(within, torch.nextafter(inner[:, -1:], torch.zeros_like(within)))
    entry = torch.searchsorted(inner, within, right=True)
    return (block * DRAW_BLOCK + entry).squeeze(1)


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


HEAD_CHUNK = 2048  # output rows of the LM head per product on a CPU (1024-4096 measured alike)
NARROW_ROWS = 16  # up to this many input rows, a CPU linear multiplies as weight @ inputᵀ (``narrow_linears``)


def _narrow_product(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk: int | None = None) -> Tensor:
    """``F.linear(hidden, weight, bias)`` for a few rows, computed as ``(weight @ hiddenᵀ)ᵀ`` (by slices of
    ``chunk`` weight rows if given). Each output is the same dot product; MKL then takes the weight as the
    left operand and streams it, where ``hidden @ weightᵀ`` first repacks the whole weight: with a handful
    of rows, a decode step is bound by reading the weights (SmolLM2-135M, 4 rows: 137 against 172 ms a step).
    The result is made contiguous (a copy of the output, small next to the weight) so the next elementwise
    kernels see the usual layout."""
    rows = hidden.reshape(-1, hidden.shape[-1]).t()
    if chunk is None:
        out = torch.mm(weight, rows)
    elif torch.is_grad_enabled() and (weight.requires_grad or rows.requires_grad):
        out = torch.cat([torch.mm(weight[start : start + chunk], rows) for start in range(0, weight.shape[0], chunk)])
    else:  # written in place: no copy of the whole logits
        out = rows.new_empty(weight.shape[0], rows.shape[1])
        for start in range(0, weight.shape[0], chunk):
            torch.mm(weight[start : start + chunk], rows, out=out[start : start + chunk])
    out = out.t().contiguous()
    if bias is not None:
        out += bias
    return out.view(*hidden.shape[:-1], weight.shape[0])


def _plain_cpu_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` with plain CPU weights and no forward set on the instance (accelerate's or
    DeepSpeed's hooks, a quantized or sharded layer are other classes or set their own and are left alone)."""
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and type(weight) is nn.Parameter and weight.device.type == "cpu"
            and "forward" not in vars(module) and not hasattr(weight, "ds_id"))


def _output_head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


@contextlib.contextmanager
def chunked_head(model: nn.Module) -> Iterator[bool]:
    """While inside, ``model``'s LM head (a plain ``nn.Linear`` on a CPU with at least two slices of
    ``HEAD_CHUNK`` outputs) computes its logits slice by slice; yields whether it does. Whatever the model
    does after its head (scaling, soft-capping) is untouched: only the head's own forward changes."""
    head = _output_head(model)
    if head is None or not _plain_cpu_linear(head) or head.out_features < 2 * HEAD_CHUNK:
        yield False
        return
    weight, bias = head.weight, head.bias

    def forward(hidden: Tensor) -> Tensor:
        if hidden.numel() <= NARROW_ROWS * hidden.shape[-1]:
            return _narrow_product(hidden, weight, bias, HEAD_CHUNK)
        return torch.cat([F.linear(hidden, weight[start : start + HEAD_CHUNK],
                                   None if bias is None else bias[start : start + HEAD_CHUNK])
                          for start in range(0, weight.shape[0], HEAD_CHUNK)], dim=-1)

    head.forward = forward
    try:
        yield True
    finally:
        del head.forward


@contextlib.contextmanager
def narrow_linears(model: nn.Module) -> Iterator[int]:
    """While inside, every plain CPU ``nn.Linear`` of ``model`` but its output head (a wide one is
    ``chunked_head``'s) multiplies inputs of at most ``NARROW_ROWS`` rows with ``_narrow_product``; yields how
    many layers."""
    head = _output_head(model)
    layers = [m for m in model.modules() if m is not head and _plain_cpu_linear(m)]

    def narrow(layer: nn.Linear):
        plain = nn.Linear.forward.__get__(layer)

        def forward(hidden: Tensor) -> Tensor:
            if hidden.numel() <= NARROW_ROWS * hidden.shape[-1]:
                return _narrow_product(hidden, layer.weight, layer.bias)
            return plain(hidden)

        return forward

    for layer in layers:
        layer.forward = narrow(layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def decode(model: nn.Module, prompts: list[list[int]], settings: DecodeSettings, samples: int = 1,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """``samples`` completions (token ids, ending at the first stop token, which is kept) of every prompt,
    prompt-major: completion k of prompt i is item ``i * samples + k``."""
    with chunked_head(model), narrow_linears(model):
        return _decode(model, prompts, settings, samples, generator)


def _choose(logits: Tensor, settings: DecodeSettings, generator: torch.Generator | None) -> Tensor:
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    points = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64, device=logits.device)
    return draw(filter_logits(logits.float(), settings).softmax(dim=-1), points)


def _decode(model: nn.Module, prompts: list[list[int]], settings: DecodeSettings, samples: int,
            generator: torch.Generator | None) -> list[list[int]]:
    device = next(model.parameters()).device
    ids, mask = _left_padded(prompts, settings.pad_id, device)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = Cache(layers=[PreallocatedLayer(ids.shape[1] + settings.max_new_tokens) for _ in range(layers)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    if samples > 1:  # one prefill per prompt, then K copies of its cache
        cache.batch_repeat_interleave(samples)
        logits, mask = logits.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)
        positions = positions.repeat_interleave(samples, 0)
    next_position = positions[:, -1:] + 1
    rows = torch.arange(logits.shape[0], device=device)  # output row of each batch row
    stops = torch.tensor(settings.stop_ids, device=device)
    out: list[list[int]] = [[] for _ in range(logits.shape[0])]
    for step in range(settings.max_new_tokens):
        tokens = _choose(logits, settings, generator)
        for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
            out[row].append(token)
        if step == settings.max_new_tokens - 1:
            break
        going = ~torch.isin(tokens, stops)
        if not going.all():
            if not going.any():
                break
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, mask, next_position = rows[keep], tokens[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position, cache=cache,
                       use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return out


def decode_supported(model: nn.Module) -> bool:
    """Whether ``decode`` covers ``model``: a decoder-only transformers model on the attention interface whose
    layers all attend fully or through a sliding window (the cache keeps every position; the mask applies
    the window). Others (recurrent or linear-attention layers, encoder-decoders) sample with ``generate``."""
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        return False
    text = config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or text is not config:
        return False
    layer_types = getattr(text, "layer_types", None) or ["full_attention"]
    return set(layer_types) <= {"full_attention", "sliding_attention"}
