"""Padding-free, prefix-shared forwards: the rows of a right-padded batch as one packed sequence.

A batch of N right-padded rows ``(N, T)`` becomes one row of the L real tokens. Rows that begin with the same
shareable prefix (for a preference pair: the prompt, identical in its chosen and rejected rows) form a
*group* ``[prefix, rest of row 1, rest of row 2, ...]``: the prefix is computed once and every row's rest
attends to it. Position ids restart in every group and each row's rest continues the prefix's positions, so
every token sees exactly the positions and the keys it sees in the padded batch: the hidden states are the
same up to floating-point summation order.

Why a packed sequence with per-group attention (and not a shared KV cache): the linear layers, which hold
almost all of the FLOPs, run once over the L real tokens of the whole batch in one matrix product, prompt
counted once, no padding; gradients flow into the shared prompt from both completions through ordinary
autograd, with gradient checkpointing and LoRA unchanged; and one forward covers any number of rows per
prompt (pairs, KTO's mismatched rows, ranked lists). A KV cache would need a second forward per batch,
expanded cache copies per completion, and padding inside each of the two passes. Attention is the only
layer that must know the groups: transformers' attention interface (``_supports_attention_backend``) lets
a registered function replace it, which runs ``scaled_dot_product_attention`` block by block on slices of
the packed sequence: a group's prefix with its first row is one causal sequence (sdpa's causal kernel), and
each further row's queries attend to the prefix's keys and, causally, to their own (a small mask); no
attention is ever computed between sibling rows or across groups.

The last layer computes only the rows its caller reads (``read``): log-probs read the positions that
predict a completion token, a reward model each text's last token. Every row's output of an earlier layer
feeds the next layer's keys and values, but in the last layer the other rows contribute only their keys and
values, which come from the layer's input. So there their queries, attention, output projection and MLP are
not computed (forward hooks run those row-wise modules on the read rows and put zeros elsewhere; the packed
attention computes the read queries only): with ~500-token prompts and 60-token completions that is 80% of
the last layer's work, a fifth of a 4-layer backbone's. Exact: the read rows get the same products. The
other rows of the returned states then hold unspecified values.

Models whose attention is not ``sdpa`` through that interface (eager attention with soft-capping or sinks,
flash-attention, older architectures) keep the padded forward; so does a batch that is not right-padded.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger("preftune")
ATTENTION_NAME = "preftune_packed"
MODES = ("prefix_shared", "padding_free", "padded")


@dataclass
class Block:
    """One ``scaled_dot_product_attention`` call: the queries of ``query`` attend to the keys of ``keys``
    (spans of the packed sequence, concatenated). A group's first row and the shared prefix form one causal
    block; each later row of the group is a block whose queries see the prefix and, causally, themselves."""

    query: tuple[int, int]
    keys: list[tuple[int, int]]
    query_positions: Tensor  # (Q,) position ids of the queries
    key_positions: Tensor  # (K,) position ids of the keys
    read: Tensor | None = None  # (q,) offsets of the queries whose last-layer output is read; None: all
    _biases: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def causal(self) -> bool:
        """Queries and keys are the same span: plain causal attention (sdpa's own causal kernel)."""
        return self.keys == [self.query]

    def mask(self, sliding_window: int | None, queries: Tensor | None = None) -> Tensor | None:
        """(1, 1, Q, K) bool, True where a query may attend to a key; None for plain causal attention.
        ``queries``: offsets of the only queries to mask for (the read ones), ``(1, 1, q, K)``."""
        if queries is None and self.causal and sliding_window is None:
            return None
        positions = self.query_positions if queries is None else self.query_positions[queries]
        q, k = positions[:, None], self.key_positions[None, :]
        allowed = k <= q
        if sliding_window is not None:  # as transformers' sliding_window_overlay: q - kv < window
            allowed &= (q - k) < sliding_window
        return allowed[None, None]

    def bias(self, sliding_window: int | None, read_only: bool, dtype: torch.dtype) -> Tensor | None:
        """``mask`` (for the read queries when ``read_only``) as the additive 0 / -inf mask sdpa turns a boolean
        one into at every call, made once per batch: every layer, the reference's forward and backward share it
        (same values, so bitwise the same attention; the per-call conversions and comparisons were ~2% of a
        long-prompt step)."""
        key = sliding_window, read_only, dtype
        if key not in self._biases:
            allowed = self.mask(sliding_window, self.read if read_only else None)
            self._biases[key] = None if allowed is None else torch.zeros(
                allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        return self._biases[key]


@dataclass
class PackedBatch:
    input_ids: Tensor  # (1, L)
    position_ids: Tensor  # (1, L)
    blocks: list[Block]  # in packed order of their queries: every token is the query of exactly one block
    where: Tensor  # (N, T) long: index in the packed sequence of each row's token; -1 at padding
    shared_rows: int  # rows whose prefix another row computes
    read: Tensor | None = None  # (R,) sorted packed indices whose last hidden state is read; None: all
    last_attention: nn.Module | None = None  # the last layer's attention, which computes the read queries only

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def _right_padded(attention_mask: Tensor, lengths: Tensor) -> bool:
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool(((columns[None, :] < lengths[:, None]) == attention_mask.bool()).all())


def pack_rows(input_ids: Tensor, attention_mask: Tensor, shared_prefix: Tensor | None = None) -> PackedBatch | None:
    """The packed form of right-padded rows, or None when the rows are not right-padded.

    input_ids, attention_mask ``(N, T)``; shared_prefix ``(N,)``: how many leading tokens of each row may be
    shared with other rows that begin with the same tokens (None: nothing is shared, padding-free only).
    """
    lengths = attention_mask.sum(dim=1)
    if not _right_padded(attention_mask, lengths):
        return None
    ids = input_ids.cpu()
    lengths_list = lengths.tolist()
    groups_of: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for row, length in enumerate(lengths_list):
        share = min(int(shared_prefix[row]), length) if shared_prefix is not None else 0
        key = (share, tuple(ids[row, :share].tolist())) if share > 0 else ("row", row)
        if key not in groups_of:
            groups_of[key] = []
            order.append(key)
        groups_of[key].append(row)
    pieces, positions, blocks, shared, cursor = [], [], [], 0, 0
    where = torch.full(ids.shape, -1, dtype=torch.long)
    for key in order:
        rows = groups_of[key]
        share = key[0] if len(rows) > 1 else 0
        prefix = (cursor, cursor + share)
        for i, row in enumerate(rows):
            first = 0 if i == 0 else share  # the first row carries the shared prefix
            span = (cursor, cursor + lengths_list[row] - first)
            pieces.append(ids[row, first : lengths_list[row]])
            positions.append(torch.arange(first, lengths_list[row]))
            where[row, first : lengths_list[row]] = torch.arange(*span)
            if i > 0:
                where[row, :share] = torch.arange(*prefix)
            if span[1] > span[0]:  # a row that is all prefix has no queries of its own
                keys = [span] if i == 0 else [prefix, span]
                key_positions = torch.arange(0, lengths_list[row]) if i > 0 else positions[-1]
                blocks.append(Block(span, keys, positions[-1], key_positions))
            cursor = span[1]
        shared += len(rows) - 1 if share else 0
    device = input_ids.device
    for block in blocks:
        block.query_positions, block.key_positions = block.query_positions.to(device), block.key_positions.to(device)
    return PackedBatch(torch.cat(pieces)[None].to(device), torch.cat(positions)[None].to(device), blocks,
                       where.to(device), shared)


def _block_inputs(blocks: list[Block], query: Tensor, key: Tensor, value: Tensor):
    """Each block's (queries, keys, values) out of (1, H, L, D) packed states. The sequence is split once into
    the blocks' query spans (they tile it in order), and a block's keys are pieces of those spans: a later
    row's prefix lies at the start of its group's first span. Under autograd a split's backward is one
    concatenation of the pieces' gradients, where a slice per block would allocate and add a zero gradient
    the size of the whole sequence, for every block of every layer."""
    starts = [block.query[0] for block in blocks]
    sizes = [block.query[1] - block.query[0] for block in blocks]
    queries, keys, values = (states.split(sizes, dim=2) for states in (query, key, value))

    def piece(parts: tuple[Tensor, ...], span: tuple[int, int]) -> Tensor:
        j = bisect.bisect_right(starts, span[0]) - 1
        low, high = span[0] - starts[j], span[1] - starts[j]
        return parts[j] if (low, high) == (0, sizes[j]) else parts[j][:, :, low:high]

    for i, block in enumerate(blocks):
        if block.causal:
            yield queries[i], keys[i], values[i]
        else:
            yield (queries[i], torch.cat([piece(keys, span) for span in block.keys], dim=2),
                   torch.cat([piece(values, span) for span in block.keys], dim=2))


def _packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout=0.0,
                      scaling=None, preftune_packed: PackedBatch | None = None, sliding_window=None, **kwargs):
    """sdpa, group by group over (1, H, L, D) packed states (see the module docstring); without a packed
    batch (generation, padded batches) exactly transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if preftune_packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
        raise ValueError("packed attention does not support attention soft-capping or sinks; set training.packing=padded")
    outputs = []
    blocks = preftune_packed.blocks
    read_only = preftune_packed.read is not None and module is preftune_packed.last_attention
    for block, (queries, keys, values) in zip(blocks, _block_inputs(blocks, query, key, value), strict=True):
        if read_only and block.read is not None:  # the last layer: the read queries only, zeros elsewhere
            rows = queries.new_zeros(queries.shape[0], queries.shape[2], queries.shape[1], value.shape[-1])
            if block.read.numel():
                out, _ = sdpa_attention_forward(module, queries.index_select(2, block.read), keys, values,
                                                block.bias(sliding_window, True, queries.dtype), dropout=dropout,
                                                scaling=scaling, is_causal=False)
                rows = rows.index_copy(1, block.read, out)
            outputs.append(rows)
            continue
        mask = block.bias(sliding_window, False, queries.dtype)
        out, _ = sdpa_attention_forward(module, queries, keys, values, mask, dropout=dropout, scaling=scaling,
                                        is_causal=mask is None)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def _use_packed_attention(config) -> None:
    """Route the model's attention through ``_packed_attention`` for good: the function is sdpa itself unless a
    forward passes a packed batch, and it must stay in place for gradient checkpointing, which recomputes
    layers during backward. Masks for ordinary forwards are built as for sdpa. (transformers does not save
    the attention implementation with the model.)"""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _packed_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if config._attn_implementation != ATTENTION_NAME:
        config._attn_implementation = ATTENTION_NAME


def supports_packing(backbone: nn.Module) -> bool:
    """Whether ``backbone`` (a transformers decoder, PEFT-unwrapped) routes attention through the attention
    interface with sdpa and no soft-capping: then the packed attention above computes what sdpa computes."""
    config = getattr(backbone, "config", None)
    if config is None or not getattr(backbone, "_supports_attention_backend", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION_NAME):
        return False
    if getattr(config, "is_encoder_decoder", False):
        return False
    if not getattr(config, "is_causal", True):
        return False
    return getattr(config, "attn_logit_softcapping", None) is None


_WARNED: set[str] = set()
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)
_READ = threading.local()  # .rows: (R,) packed indices the last layer computes, while it runs; else None


def _row_wise_modules(layer: nn.Module) -> list[nn.Module]:
    """The modules of a decoder layer that act on each row alone and whose rows other layers never read: the
    query and output projections and a dense MLP. Empty when the layer is not shaped so (a mixture of experts
    routes, and records router logits, over all rows)."""
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attention is None or mlp is None or hasattr(mlp, "experts"):
        return []
    projections = [getattr(attention, name, None) for name in ("q_proj", "o_proj")]
    return [module for module in (*projections, mlp) if module is not None]


def _take_read_rows(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a row-wise module of the last layer: its (1, L, H) input at the read rows only."""
    rows = getattr(_READ, "rows", None)
    if rows is None or not args or not isinstance(args[0], Tensor) or args[0].shape[1] != _READ.length:
        return None  # not in a reading forward, or called in a way this hook does not know: all rows run
    return (args[0].index_select(1, rows), *args[1:])


def _put_read_rows(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    """Forward hook of a row-wise module of the last layer: its output back at every row, zeros where not read."""
    rows = getattr(_READ, "rows", None)
    if rows is None or not isinstance(output, Tensor) or output.shape[1] != rows.numel():
        return None
    return output.new_zeros(output.shape[0], _READ.length, output.shape[-1]).index_copy(1, rows, output)


def _last_layer(backbone: nn.Module) -> nn.Module | None:
    """The last decoder layer with its row-wise modules hooked to compute the read rows only, or None when the
    layer cannot. The hooks are installed once and act only while a packed forward with ``read`` rows runs the
    layer: its attention's pre-hook, which sees the packed batch, starts the reading, and the MLP's forward hook
    (the layer's last row-wise module) ends it, so that gradient checkpointing, which reruns the layer's
    ``forward`` (not its hooks) in backward, reads the same rows again; the layer's own forward hook ends it too
    should the layer fail half-way."""
    layers = getattr(backbone, "layers", None)
    count = getattr(backbone.config, "num_hidden_layers", None)
    if not isinstance(layers, nn.ModuleList) or not count or len(layers) < count:
        return None
    layer = layers[count - 1]
    if getattr(layer, "_preftune_read_rows", None) is None:
        modules = _row_wise_modules(layer)
        layer._preftune_read_rows = bool(modules)
        if modules:
            layer.self_attn.register_forward_pre_hook(_start_reading, with_kwargs=True)
            for module in modules:
                module.register_forward_pre_hook(_take_read_rows)
                module.register_forward_hook(_put_read_rows)
            modules[-1].register_forward_hook(_stop_reading, always_call=True)
            layer.register_forward_hook(_stop_reading, always_call=True)
    return layer if layer._preftune_read_rows else None


def _start_reading(attention: nn.Module, args: tuple, kwargs: dict) -> None:
    packed = kwargs.get("preftune_packed")
    reading = packed is not None and packed.read is not None and packed.last_attention is attention
    _READ.rows, _READ.length = (packed.read, packed.tokens) if reading else (None, 0)


def _stop_reading(module: nn.Module, args: tuple, output) -> None:
    _READ.rows = None


def _set_read(packed: PackedBatch, backbone: nn.Module, read: tuple[Tensor, Tensor]) -> None:
    """Make the last layer of ``backbone`` compute only the packed rows of the ``read`` (rows, cols) positions."""
    layer = _last_layer(backbone)
    indices = packed.where[read]
    indices = indices[indices >= 0].unique()
    if layer is None or indices.numel() == packed.tokens:
        return
    packed.read, packed.last_attention = indices, layer.self_attn
    for block in packed.blocks:
        start, end = block.query
        block.read = indices[(indices >= start) & (indices < end)] - start


def backbone_hidden(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, packing: str = "prefix_shared",
                    shared_prefix: Tensor | None = None, read: tuple[Tensor, Tensor] | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Last hidden states of every row's tokens: ``(hidden (L, H), where (N, T))``, where ``hidden[where[r, t]]``
    is row r's state at position t (``where`` is -1 at padding).

    ``packing``: ``prefix_shared`` (rows with the same ``shared_prefix`` tokens compute it once),
    ``padding_free`` (no padding, nothing shared) or ``padded`` (the plain batch). A model or batch that
    cannot be packed runs padded. ``read`` ``(rows, cols)``: the positions the caller reads; a packed forward's
    last layer then computes those rows only, and the states at other positions are unspecified.
    """
    if packing not in MODES:
        raise ValueError(f"packing must be one of {', '.join(MODES)}, got {packing!r}")
    packed = None
    if packing != "padded" and supports_packing(backbone):
        packed = pack_rows(input_ids, attention_mask, shared_prefix if packing == "prefix_shared" else None)
    elif packing != "padded":
        name = type(backbone).__name__
        if name not in _WARNED:
            _WARNED.add(name)
            log.info("%s does not route attention through sdpa's interface: its batches run padded", name)
    if packed is None:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        n_rows, width = input_ids.shape
        where = torch.arange(n_rows * width, device=input_ids.device).view(n_rows, width)
        return hidden.reshape(n_rows * width, -1), where.masked_fill(attention_mask == 0, -1)
    _use_packed_attention(backbone.config)
    if read is not None:
        _set_read(packed, backbone, read)
    # A 4-D mask is passed through untouched (transformers builds none); the packed attention ignores it.
    hidden = backbone(input_ids=packed.input_ids, attention_mask=_NO_MASK.to(input_ids.device),
                      position_ids=packed.position_ids, use_cache=False, preftune_packed=packed).last_hidden_state
    return hidden[0], packed.where


def prompt_lengths(completion_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """(N,) tokens before each row's first completion token (the whole row when it has none)."""
    has = completion_mask.any(dim=1)
    first = completion_mask.to(torch.int8).argmax(dim=1)
    return torch.where(has, first, attention_mask.sum(dim=1))
