"""The KV cache of preftune's decode loop (``decode``): the slot cache of continuous batching, where each row
("slot") holds its own sequence at its own length, written in place, and attends through its own mask row,
in the format the model's attention implementation takes."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer


class SlotLayer(DynamicLayer):
    """One layer's KV cache for a fixed number of row slots, each holding its own sequence at its own length
    (``SlotCache.lengths``): slot ``s`` keeps position ``j`` at index ``j``, whatever its neighbours do."""

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def allocate(self, like: Tensor, capacity: int) -> None:
        """Buffers for ``capacity`` positions per slot, shaped and typed like ``like`` (a prefill's keys);
        what the slots held so far is kept."""
        _, heads, _, dim = like.shape
        # zeros, not garbage: a masked position still enters attention's products (weight 0 x a NaN is NaN)
        keys = like.new_zeros(self.owner.slots, heads, capacity, dim)
        values = like.new_zeros(self.owner.slots, heads, capacity, dim)
        if self.is_initialized:
            held = self.keys.shape[2]
            keys[:, :, :held], values[:, :, :held] = self.keys, self.values
        self.keys, self.values = keys, values
        self.device, self.is_initialized = like.device, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """One new position per slot (a decode step), written at that slot's length."""
        if key_states.shape[-2] != 1:
            raise ValueError(f"SlotCache takes one new position per slot and step, got {key_states.shape[-2]}; "
                             "prefill with another cache and copy it in (SlotCache.fill)")
        rows, at = self.owner.step_index
        self.keys[rows, :, at] = key_states[:, :, 0]
        self.values[rows, :, at] = value_states[:, :, 0]
        return self.keys[:, :, : self.owner.width], self.values[:, :, : self.owner.width]

    def get_seq_length(self) -> int:
        return self.owner.width

    def batch_select_indices(self, indices: Tensor) -> None:
        self.keys, self.values = self.keys[indices], self.values[indices]


class SlotCache(Cache):
    """The KV cache of a continuously batched decode: ``slots`` rows, each a sequence of its own length. A
    step writes every slot's new position at ``lengths[s]`` and attends to ``width`` = the longest slot's
    positions, each slot through its own mask (``begin_step``)."""

    def __init__(self, layers: int, slots: int):
        self.slots, self.capacity = slots, 0
        super().__init__(layers=[SlotLayer(self) for _ in range(layers)])
        self.lengths = torch.zeros(slots, dtype=torch.long)  # positions held per slot, on the CPU
        # (slot, write position) of the coming step, on the model's device (set by ``begin_step``)
        self.step_index: tuple[Tensor, Tensor] = (torch.arange(0), torch.arange(0))
        self.width = 1

    def reserve(self, positions: int, like: Cache) -> None:
        """Room for ``positions`` positions in every slot (buffers shaped like the prefill cache ``like``'s):
        the cache grows by half again or to ``positions`` as longer prompts come, instead of sizing every
        slot for the longest prompt of the whole job from the start."""
        if positions <= self.capacity:
            return
        self.capacity = max(positions, self.capacity * 3 // 2)
        for layer, source in zip(self.layers, like.layers, strict=True):
            layer.allocate(source.keys, self.capacity)

    def fill(self, slot: int, prefill: Cache, row: int, length: int) -> None:
        """Slot ``slot`` takes the last ``length`` positions of row ``row`` of a (left-padded) prefill cache
        (``reserve`` made room)."""
        for layer, source in zip(self.layers, prefill.layers, strict=True):
            end = source.keys.shape[2]
            layer.keys[slot, :, :length] = source.keys[row, :, end - length : end]
            layer.values[slot, :, :length] = source.values[row, :, end - length : end]
        self.lengths[slot] = length

    def select(self, keep: Tensor) -> None:
        """Only the slots ``keep`` (ascending, on the CPU) stay, renumbered 0.. in that order."""
        for layer in self.layers:
            layer.batch_select_indices(keep.to(layer.device))
        self.slots, self.lengths = len(keep), self.lengths[keep]

    def begin_step(self, layer_types: set[str], window: int | None, eager_dtype: torch.dtype | None):
        """Set up the next step (each slot writes and queries at position ``lengths[s]``; ``width`` positions
        are attended) and return its masks, in the attention implementation's format: boolean for SDPA (True
        attends), additive in ``eager_dtype`` for the eager one; one mask, or one per layer type when the model
        mixes full and sliding-window layers."""
        self.width = int(self.lengths.max()) + 1
        kv = torch.arange(self.width)
        query = self.lengths[:, None]
        full = kv[None, :] <= query
        masks = {"full_attention": full}
        if "sliding_attention" in layer_types:  # transformers' sliding_window_overlay: kv > q - window
            masks["sliding_attention"] = full & (kv[None, :] > query - window)
        device = self.layers[0].device
        self.step_index = (torch.arange(self.slots, device=device), self.lengths.to(device))
        for kind, mask in masks.items():
            mask = mask[:, None, None, :].to(device)
            if eager_dtype is not None:
                mask = torch.zeros(mask.shape, dtype=eager_dtype, device=device).masked_fill_(
                    ~mask, torch.finfo(eager_dtype).min)
            masks[kind] = mask
        return masks if len(layer_types) > 1 else masks[next(iter(layer_types))]


def mask_kind(model: nn.Module) -> str | None:
    """``"sdpa"`` (boolean, True attends) or ``"eager"`` (additive) for the 4-D masks the model's attention
    takes, read from the mask function transformers has registered for its implementation (preftune's
    packed-sequence attention, for one, registers SDPA's); None for others (flash, flex)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    function = ALL_MASK_ATTENTION_FUNCTIONS.get(getattr(model.config, "_attn_implementation", None) or "")
    return {sdpa_mask: "sdpa", eager_mask: "eager"}.get(function)


def layer_types(model: nn.Module) -> tuple[set[str], int | None]:
    """The attention kinds of the model's layers and the sliding window: ``layer_types`` where the config has
    them; otherwise every layer is a sliding-window one when ``sliding_window`` is set (Mistral's rule)."""
    text = model.config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types:
        return set(types), window
    return ({"sliding_attention"} if window else {"full_attention"}), window
