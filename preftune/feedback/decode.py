"""Batched decoding for the Hugging Face backend: what ``model.generate`` computes, with less work per token.

- Each prompt is prefilled once, whatever the number of samples K: its KV cache is then copied into K rows
  (``generate(num_return_sequences=K)`` prefills K copies).
- Continuous batching (``decode_stream``): a fixed number of rows ("slots") decode together, each its own
  sequence at its own length in a slot KV cache (``kv_slots.SlotCache``: written in place, grown only when a
  longer prompt comes, one mask row per slot). When a row ends, its slot is refilled by the next prompt
  (prefilled, its cache copied in) instead of idling until the batch's longest row ends, so a step keeps
  multiplying as many rows as it can; once no prompt is left, ended rows leave the batch. ``generate`` pads
  finished rows and keeps computing them, and a batch lasts as long as its longest row.
- The per-token loop is a plain tensor loop: no logits processors, stopping criteria or output objects.
- On a CPU every linear layer, the LM head included, multiplies through a copy of its weight prepacked once
  for oneDNN (``packed_linears``): a decode step multiplies a few dozen rows by every weight, which MKL's
  plain product repacks at every call (SmolLM2-135M's shapes with 32 rows: 1.6-2.9x faster products).
- A token is drawn by inverting its row's cumulative distribution at one uniform number, searched block by
  block (``draw``), where ``torch.multinomial`` draws an exponential variate for every vocabulary entry;
  temperature and ``exp`` are applied in place to the logits, and the float64 copy the search sums lives in
  one buffer for the whole decode (fresh multi-megabyte tensors at every token cost page faults).

Greedy decoding gives ``generate``'s tokens (a row's tokens depend only on its own prompt under a causal
mask; tests check it token for token, rows refilled through one to five slots, SDPA's and the eager
attention's masks, a sliding window). Sampling draws sample k of prompt i from the uniform numbers of a
``torch.Generator`` seeded with the caller's seed for prompt i: a prompt's samples are a pure function of its
prompt, the settings and its seed, whatever was decoded beside it, so a job resumes prompt by prompt.
Temperature, top-k and top-p filter the logits as transformers' warpers do (temperature, then top-k, then
top-p, keeping at least one token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from .kv_slots import SlotCache, layer_types, mask_kind


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


def draw(probs: Tensor, points: Tensor, workspace: Tensor | None = None) -> Tensor:
    """One index per row of ``probs`` (R, V; non-negative weights, normalised or not), drawn with probability
    ``probs[r, v] / probs[r].sum()``, by inverting each row's cumulative distribution (in float64) at
    ``points[r]``, a uniform number in [0, 1).

    The search has two levels: the block of ``DRAW_BLOCK`` entries holding the point (cumulative sums of the
    block totals), then the entry inside that block. It picks the entry one cumulative sum over the whole row
    picks (up to the rounding of float64 sums of the same terms taken in another order), with the float64
    conversion and cumulative sum of one block per row instead of the whole vocabulary:
    for 32 rows over SmolLM2's 49,152 tokens, 1.2 ms against 18 ms. (``torch.multinomial`` draws an
    exponential variate for every entry: 47 ms.) An entry of probability 0 is never drawn: the point is kept
    below each level's total, so it falls in a block, then an entry, whose cumulative sum grows there.
    ``workspace``, a float64 tensor of at least R x V' entries (V rounded up to whole blocks), holds the
    float64 copy the block totals are summed from: a decode loop passes the same one at every token instead
    of allocating (and page-faulting) megabytes per step."""
    rows, width = probs.shape
    blocks = -(-width // DRAW_BLOCK)
    workspace = draw_workspace(probs, rows) if workspace is None else workspace
    padded = workspace.view(-1)[: rows * blocks * DRAW_BLOCK].view(rows, blocks * DRAW_BLOCK)
    padded[:, :width] = probs
    padded[:, width:] = 0
    padded = padded.view(rows, blocks, DRAW_BLOCK)
    ends = padded.sum(-1).cumsum(-1)
    target = points[:, None].to(ends) * ends[:, -1:]
    target = torch.minimum(target, torch.nextafter(ends[:, -1:], torch.zeros_like(target)))
    block = torch.searchsorted(ends, target, right=True)
    within = target - F.pad(ends, (1, 0)).gather(1, block)  # minus the cumulative sum before the block
    inner = padded[torch.arange(rows, device=probs.device), block.squeeze(1)].cumsum(-1)
    within = torch.minimum(within, torch.nextafter(inner[:, -1:], torch.zeros_like(within)))
    entry = torch.searchsorted(inner, within, right=True)
    return (block * DRAW_BLOCK + entry).squeeze(1)


def draw_workspace(probs: Tensor, rows: int) -> Tensor:
    """A float64 buffer ``draw`` can use for up to ``rows`` rows as wide as ``probs``'s."""
    return probs.new_empty(rows * -(-probs.shape[-1] // DRAW_BLOCK) * DRAW_BLOCK, dtype=torch.float64)


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def _plain_cpu_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` with plain fp32 or bf16 CPU weights and no forward set on the instance
    (accelerate's or DeepSpeed's hooks, a quantized or sharded layer are other classes or set their own and
    are left alone)."""
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and type(weight) is nn.Parameter and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16) and "forward" not in vars(module)
            and not hasattr(weight, "ds_id"))


def _available_memory() -> int:
    """Bytes of memory the system could still hand out (``MemAvailable``), or 0 where it cannot tell."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def packed_linears(model: nn.Module, rows: int) -> Iterator[int]:
    """While inside, every plain CPU ``nn.Linear`` of ``model`` (its LM head included) multiplies through a
    copy of its weight reordered once into oneDNN's blocked layout for about ``rows`` input rows
    (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what ``torch.compile`` itself does
    to frozen CPU linears); yields how many layers.

    A decode step multiplies a few dozen rows by every weight of the model, which MKL's plain product
    repacks on every call; from the prepacked layout the same products ran 1.6-2.9x faster (fp32, 8 and 32
    rows, SmolLM2-135M's shapes, weights streaming from memory; 1.4x with 360 prefill rows). Each output is
    the same dot product summed in another order (fp32: within 1e-5 relative). The copies take as much memory
    as the weights, so layers are packed only where oneDNN is there, no gradient is wanted, and the copies
    leave at least as much memory free again; they are dropped on leaving."""
    layers = [m for m in model.modules() if _plain_cpu_linear(m)]
    needed = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if (not layers or torch.is_grad_enabled() or not torch.backends.mkldnn.is_available()
            or 2 * needed > _available_memory()):
        yield 0
        return
    mkldnn = torch.ops.mkldnn

    def packed(layer: nn.Linear):
        weight, bias = mkldnn._reorder_linear_weight(layer.weight.detach(), rows), layer.bias
        plain = nn.Linear.forward.__get__(layer)

        def forward(hidden: Tensor) -> Tensor:
            if torch.is_grad_enabled():  # the packed product has no backward: a caller training meanwhile
                return plain(hidden)
            flat = hidden.reshape(-1, hidden.shape[-1])
            out = mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
            return out.view(*hidden.shape[:-1], out.shape[-1])

        return forward

    for layer in layers:
        layer.forward = packed(layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def decode(model: nn.Module, prompts: list[list[int]], settings: DecodeSettings, samples: int = 1,
           seeds: Sequence[int] | None = None, slots: int | None = None) -> list[list[int]]:
    """``samples`` completions (token ids, ending at the first stop token, which is kept) of every prompt,
    prompt-major: completion k of prompt i is item ``i * samples + k``. See ``decode_stream``."""
    out: list[list[int]] = [[] for _ in range(len(prompts) * samples)]
    for i, completions in decode_stream(model, prompts, settings, samples, seeds, slots):
        out[i * samples : (i + 1) * samples] = completions
    return out


def decode_stream(model: nn.Module, prompts: list[list[int]], settings: DecodeSettings, samples: int = 1,
                  seeds: Sequence[int] | None = None, slots: int | None = None) -> Iterator[tuple[int, list[list[int]]]]:
    """``(i, the samples completions of prompt i)``, each prompt as soon as its last sample ends.

    ``slots`` rows decode at once (default: all prompts' samples). A prompt enters when ``samples`` slots are
    free: it is prefilled once, its cache copied into its slots, and its rows join the running batch; a slot
    that ends is refilled by the next prompt, so the rows computed stay ``slots`` until the prompts run out
    (then ended rows leave the batch). Sample k of prompt i draws its tokens from the uniform numbers of
    ``torch.Generator().manual_seed(seeds[i])`` (default seed i), row k: a prompt's samples depend on its
    seed only, never on the prompts decoded beside it, the slots, or the order."""
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"decode: {len(seeds)} seeds for {len(prompts)} prompts")
    if not prompts:
        return iter(())
    slots = max(samples, min(slots or len(prompts) * samples, len(prompts) * samples))
    return _SlotDecoder(model, prompts, settings, samples, seeds, slots).run()


def _choose(logits: Tensor, settings: DecodeSettings, points: Tensor, workspace: Tensor | None = None) -> Tensor:
    """The next token of each row: the most likely one greedy, else drawn at ``points`` from the filtered
    distribution. Overwrites ``logits``: with no top-k / top-p, temperature and ``exp(logit - max)`` are
    applied in place (``draw`` takes unnormalised weights, so the softmax's division is left out)."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    if settings.top_k or settings.top_p < 1.0:
        logits = filter_logits(logits.float(), settings)
    elif logits.dtype != torch.float32:
        logits = logits.float() / settings.temperature
    elif settings.temperature != 1:
        logits.div_(settings.temperature)
    weights = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return draw(weights, points, workspace)


class _SlotDecoder:
    """The state of one continuously batched decode (``decode_stream``)."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], settings: DecodeSettings, samples: int,
                 seeds: list[int], slots: int):
        self.model, self.prompts, self.settings, self.samples = model, prompts, settings, samples
        self.device = next(model.parameters()).device
        self.layer_types, self.window = layer_types(model)
        self.eager_dtype = next(model.parameters()).dtype if mask_kind(model) == "eager" else None
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = SlotCache(layers, slots)
        self.owner: list[tuple[int, int] | None] = [None] * slots  # (prompt, sample) decoding in each slot
        self.tokens = torch.full((slots,), settings.pad_id, dtype=torch.long)  # each slot's next input token
        self.points = torch.zeros(slots, settings.max_new_tokens, dtype=torch.float64)  # its uniform numbers
        self.workspace: Tensor | None = None  # draw's float64 copy of the weights, reused at every token
        self.waiting, self.seeds = list(range(len(prompts)))[::-1], seeds
        self.out: dict[int, list[list[int]]] = {}
        self.unfinished: dict[int, int] = {}  # prompt -> samples still decoding

    def run(self) -> Iterator[tuple[int, list[list[int]]]]:
        with torch.no_grad(), packed_linears(self.model, self.cache.slots):
            yield from self._admit()
            while any(o is not None for o in self.owner):
                masks = self.cache.begin_step(self.layer_types, self.window, self.eager_dtype)
                logits = self.model(input_ids=self.tokens[:, None].to(self.device), attention_mask=masks,
                                    position_ids=self.cache.lengths[:, None].to(self.device), cache=self.cache,
                                    use_cache=True).logits[:, -1]
                live = [s for s, o in enumerate(self.owner) if o is not None]
                self.cache.lengths[live] += 1
                yield from self._take(live, logits if len(live) == len(self.owner) else logits[live])
                yield from self._admit()
                if not self.waiting and None in self.owner:  # no prompt left to refill a slot: drop the ended
                    self._compact()

    def _admit(self) -> Iterator[tuple[int, list[list[int]]]]:
        """Prefill as many waiting prompts as there are free slots for, and draw their first tokens."""
        free = [s for s, o in enumerate(self.owner) if o is None]
        batch = [self.waiting.pop() for _ in range(min(len(free) // self.samples, len(self.waiting)))]
        if not batch:
            return
        ids, mask = _left_padded([self.prompts[i] for i in batch], self.settings.pad_id, self.device)
        prefill = Cache(layers=[DynamicLayer() for _ in self.cache.layers])  # full layers: no window cut
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=prefill,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        taken = free[: len(batch) * self.samples]
        self.cache.reserve(ids.shape[1] + self.settings.max_new_tokens, prefill)
        for n, i in enumerate(batch):
            uniforms = self._uniforms(i)
            self.out[i], self.unfinished[i] = [[] for _ in range(self.samples)], self.samples
            for k in range(self.samples):
                slot = taken[n * self.samples + k]
                self.cache.fill(slot, prefill, n, len(self.prompts[i]))
                self.owner[slot], self.points[slot] = (i, k), uniforms[k]
        yield from self._take(taken, logits.repeat_interleave(self.samples, 0))

    def _uniforms(self, prompt: int) -> Tensor:
        """(samples, max_new_tokens) uniform numbers: row k draws sample k's tokens (none needed greedy)."""
        shape = (self.samples, self.settings.max_new_tokens)
        if self.settings.temperature == 0:
            return torch.zeros(shape, dtype=torch.float64)
        return torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(self.seeds[prompt]))

    def _take(self, live: list[int], logits: Tensor) -> Iterator[tuple[int, list[list[int]]]]:
        """Draw the next token of the slots ``live`` from their ``logits``; a slot whose row ends is freed."""
        steps = torch.tensor([len(self.out[self.owner[s][0]][self.owner[s][1]]) for s in live])
        if self.settings.temperature > 0 and self.workspace is None:
            self.workspace = draw_workspace(logits, self.cache.slots)
        chosen = _choose(logits, self.settings, self.points[live, steps].to(logits.device), self.workspace).cpu()
        self.tokens[live] = chosen
        stops = set(self.settings.stop_ids)
        for slot, token in zip(live, chosen.tolist(), strict=True):
            i, k = self.owner[slot]
            row = self.out[i][k]
            row.append(token)
            if token in stops or len(row) == self.settings.max_new_tokens:
                self.owner[slot] = None
                self.cache.lengths[slot] = 0
                self.unfinished[i] -= 1
                if not self.unfinished[i]:
                    del self.unfinished[i]
                    yield i, self.out.pop(i)

    def _compact(self) -> None:
        keep = torch.tensor([s for s, o in enumerate(self.owner) if o is not None], dtype=torch.long)
        if len(keep):
            self.cache.select(keep)
        self.owner = [self.owner[s] for s in keep.tolist()]
        self.tokens, self.points = self.tokens[keep], self.points[keep]


def decode_supported(model: nn.Module) -> bool:
    """Whether ``decode`` covers ``model``: a decoder-only transformers model on the attention interface, with
    an attention that takes SDPA's or the eager attention's 4-D masks (``kv_slots.mask_kind``: the slot
    cache hands it one mask row per slot), whose layers all attend fully or through a sliding window (the
    cache keeps every position; the mask applies the window). Others (flash or flex attention, recurrent or
    linear-attention layers, encoder-decoders) sample with ``generate``."""
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        return False
    if mask_kind(model) is None:
        return False
    text = config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or text is not config:
        return False
    kinds = getattr(text, "layer_types", None) or ["full_attention"]
    return set(kinds) <= {"full_attention", "sliding_attention"}
