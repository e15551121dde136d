"""bf16 on the hardware at hand: emulated bf16 kernels against fp32 products of the rounded operands and
against PyTorch's own bf16 kernels; frozen linear weights stored in bf16 change nothing autocast computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from preftune.config import LoraConfig
from preftune.modeling import add_lora
from preftune.testing import tiny_llama
from preftune.training import logps, precision
from preftune.training.logps import completion_logps
from preftune.training.precision import (
    EmulatedBf16Attention,
    EmulatedBf16Matmuls,
    _SharedCast,
    restore_frozen_linears,
    share_input_casts,
    store_frozen_linears_in_bf16,
)

BF16 = torch.bfloat16


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (4, 14), generator=gen)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 6:] = True
    return ids, attention, completion


def test_emulated_kernels_are_fp32_products_of_bf16_operands():
    """mm, addmm and bmm on bf16 tensors: each result is exactly fp32 matmul of the (already bf16) operands,
    rounded to bf16, and within one bf16 rounding step (2^-7 relative) of PyTorch's bf16 kernel."""
    torch.manual_seed(0)
    a, b, bias = torch.randn(16, 40).to(BF16), torch.randn(40, 24).to(BF16), torch.randn(24).to(BF16)
    x, y = torch.randn(3, 16, 40).to(BF16), torch.randn(3, 40, 8).to(BF16)
    native = {"mm": a @ b, "addmm": torch.addmm(bias, a, b), "bmm": torch.bmm(x, y)}
    with EmulatedBf16Matmuls():
        emulated = {"mm": a @ b, "addmm": torch.addmm(bias, a, b), "bmm": torch.bmm(x, y)}
    exact = {"mm": (a.float() @ b.float()).to(BF16), "addmm": torch.addmm(bias.float(), a.float(), b.float()).to(BF16),
             "bmm": torch.bmm(x.float(), y.float()).to(BF16)}
    for name, value in emulated.items():
        assert value.dtype == BF16
        assert torch.equal(value, exact[name]), name
        step = native[name].float().abs() * 2**-7 + 1e-6
        assert ((value.float() - native[name].float()).abs() <= step).all(), name


def test_emulated_autocast_forward_and_backward_track_native_bf16():
    """A tiny Llama under bf16 autocast, emulated vs PyTorch's bf16 kernels: both round the same operands to
    bf16, so log-probs (sums of ~30 log-probs near -6) agree to 0.1 and gradients to 5% of their scale, while
    both are ~1e-2 away from fp32 (the test would not tell emulation from fp32 otherwise)."""
    ids, attention, completion = _batch()
    results = {}
    for name in ("native", "emulated", "fp32"):
        model = tiny_llama(seed=0)
        with torch.autocast("cpu", dtype=BF16, enabled=name != "fp32"):
            if name == "emulated":
                with EmulatedBf16Matmuls():
                    out = completion_logps(model, ids, attention, completion)
                    out.sums.sum().backward()  # backward inside: its kernels are emulated too
            else:
                out = completion_logps(model, ids, attention, completion)
                out.sums.sum().backward()
        results[name] = out.sums.detach(), model.model.layers[0].mlp.down_proj.weight.grad
    (native, g_native), (emulated, g_emulated), (fp32, _) = results["native"], results["emulated"], results["fp32"]
    torch.testing.assert_close(emulated, native, atol=0.1, rtol=0)
    assert (native - fp32).abs().max() > 1e-3  # bf16 rounding is visible: the comparison above means something
    scale = g_native.abs().max()
    assert (g_emulated - g_native).abs().max() <= 0.05 * scale


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_linears_in_bf16_give_bitwise_the_same_autocast_logps(tied):
    """LoRA on a tiny Llama: the frozen base projections (and an untied LM head) go to bf16; LoRA weights,
    embeddings, norms and a head tied to the embeddings stay fp32. Under bf16 autocast every forward value
    and LoRA gradient is bitwise unchanged (autocast rounded those weights to bf16 anyway)."""
    base = tiny_llama(seed=0)
    if tied:
        base.config.tie_word_embeddings = True
        base.lm_head.weight = base.model.embed_tokens.weight
    model = add_lora(base, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    stored = copy.deepcopy(model)
    moved = store_frozen_linears_in_bf16(stored)
    layer = stored.base_model.model.model.layers[0]
    assert layer.self_attn.k_proj.weight.dtype == BF16 and layer.self_attn.q_proj.base_layer.weight.dtype == BF16
    assert layer.self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert layer.input_layernorm.weight.dtype == torch.float32
    assert stored.base_model.model.model.embed_tokens.weight.dtype == torch.float32
    assert (stored.base_model.model.lm_head.weight.dtype == torch.float32) == tied
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 256  # q, o (64x64); k, v (32x64: 2 kv heads); mlp
    assert moved == 2 * per_layer + (0 if tied else 512 * 64)
    ids, attention, completion = _batch()
    outs = []
    for m in (model, stored):
        with torch.autocast("cpu", dtype=BF16):
            out = completion_logps(m, ids, attention, completion)
        out.sums.sum().backward()
        outs.append((out.sums, layer_grad(m)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    restore_frozen_linears(stored, torch.float32)
    assert stored.base_model.model.model.layers[0].self_attn.k_proj.weight.dtype == torch.float32


def layer_grad(model):
    return model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight.grad


class _CastsOf(TorchDispatchMode):
    """Counts the dtype conversions (``aten._to_copy``) of fp32 tensors of one shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
            self.count += args[0].dtype == torch.float32
        return func(*args, **(kwargs or {}))


def test_a_frozen_head_tied_to_the_embeddings_is_cast_to_bf16_once_and_kept(monkeypatch):
    """LoRA on a tiny Llama whose LM head is its frozen fp32 embedding (tied, so it stays fp32), 3 positions per
    chunk: 4 rows x 8 scored positions = 32 positions, ceil(32 / 3) = 11 chunks. Autocast alone casts the
    512 x 64 head weight at each chunk's forward and again at its recomputation in backward: 22 casts. preftune
    casts it once (and runs the chunks through ``HeadLogprobs``), and the log-probs and LoRA gradients are
    bitwise the same; the next forward and backward reuse that copy (0 casts) and give the same numbers."""
    base = tiny_llama(seed=0)
    base.config.tie_word_embeddings = True
    base.lm_head.weight = base.model.embed_tokens.weight
    model = add_lora(base, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    ids, attention, completion = _batch()
    results = {}
    for name in ("per chunk", "once", "kept"):
        if name == "per chunk":  # what autocast does with the head itself
            monkeypatch.setattr(logps, "linear_head", lambda head, device: None)
        else:
            monkeypatch.undo()
        model.zero_grad(set_to_none=True)
        with _CastsOf((512, 64)) as casts:
            with torch.autocast("cpu", dtype=BF16):
                out = completion_logps(model, ids, attention, completion, chunk_size=3)
            out.sums.sum().backward()
        results[name] = casts.count, out.token_logps.detach(), layer_grad(model).clone()
    (chunked, logps_a, grad_a), (once, logps_b, grad_b), (kept, logps_c, grad_c) = results.values()
    assert (chunked, once, kept) == (22, 1, 0)
    assert torch.equal(logps_a, logps_b) and torch.equal(grad_a, grad_b)
    assert torch.equal(logps_b, logps_c) and torch.equal(grad_b, grad_c)


class _ActivationCasts(TorchDispatchMode):
    """Counts fp32 -> bf16 conversions of the tiny Llama's 3-D activations (hidden size 64)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if (func is torch.ops.aten._to_copy.default and x.dtype == torch.float32 and x.ndim == 3
                and x.shape[-1] == 64 and kwargs.get("dtype") == BF16):
            self.count += 1
        return func(*args, **(kwargs or {}))


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("setup", ["lora", "lora with dropout", "full"])
def test_one_bf16_copy_per_activation_changes_no_value_or_gradient(setup):
    """A tiny Llama (2 layers) under bf16 autocast, with LoRA on all seven projections or fully trainable;
    fp32 -> bf16 casts of its ``(N, T, 64)`` activations in a forward and backward (padded, so that every
    layer computes every row: a packed forward's last layer computes only the rows read, and the query
    projection's input there is those rows, a tensor cast on its own). Forward, autocast casts
    the fp32 normed input of q, k and v once per linear call: with LoRA 6 casts (3 base layers, 3 adapters),
    plus 1 for o_proj's adapter (PEFT casts the bf16 attention output up to fp32, autocast back down), plus 4
    for gate and up: 11 per layer; fully trainable 3 + 2 = 5 per layer. Shared, it is 2 per layer: the
    attention input and the MLP input. With adapter dropout each adapter sees the dropout's own output (a new
    tensor, cast on its own) and o_proj keeps its round trip: 1 + 3 + 1 + 1 + 2 = 8 per layer. Backward adds
    casts that stay: the fp32 residual gradient into o_proj's and down_proj's bf16 outputs (2 per layer) and,
    with PEFT's round trip, its gradient back into bf16 (1 per layer). Log-probs and every gradient are
    bitwise the same."""
    dropout = 0.1 if setup == "lora with dropout" else 0.0
    base = tiny_llama(seed=0)
    model = base if setup == "full" else add_lora(base, LoraConfig(enabled=True, r=4, alpha=8, dropout=dropout,
                                                                   target_modules=ALL_PROJECTIONS))
    if setup != "full":  # LoRA B starts at zero: give the adapters something to pass on
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    shared = copy.deepcopy(model)
    assert share_input_casts(shared) == {"lora": 7 * 2 * 4 + 1, "lora with dropout": 7 * 2 * 3 + 1, "full": 7 * 2 + 1}[setup]
    assert share_input_casts(shared) == 0  # once only
    ids, attention, completion = _batch()
    results = []
    for m in (model, shared):
        torch.manual_seed(1)  # the same dropout masks
        with _ActivationCasts() as casts:
            with torch.autocast("cpu", dtype=BF16):
                out = completion_logps(m, ids, attention, completion, packing="padded")
            out.sums.sum().backward()
        results.append((casts.count, out.token_logps.detach(), {n: p.grad for n, p in m.named_parameters()
                                                                   if p.grad is not None}))
    (plain, logps_a, grads_a), (once, logps_b, grads_b) = results
    assert (plain, once) == {"lora": (28, 8), "lora with dropout": (28, 22), "full": (14, 8)}[setup]
    assert torch.equal(logps_a, logps_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name


def test_a_shared_copy_is_made_again_after_an_in_place_change():
    """The one bf16 copy belongs to a tensor and its version: after ``x`` changes in place, or after someone
    changes a handed-out copy in place, the next call casts afresh; each call's gradient is cast back to fp32."""
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with torch.no_grad():
        first = _SharedCast.apply(x, BF16)
        second = _SharedCast.apply(x, BF16)
        assert first.data_ptr() == second.data_ptr()  # one copy
        x.mul_(2)
        assert torch.equal(_SharedCast.apply(x, BF16), torch.tensor([2.0, 4.0, 6.0], dtype=BF16))
        handed = _SharedCast.apply(x, BF16)
        handed.add_(1)
        assert torch.equal(_SharedCast.apply(x, BF16), torch.tensor([2.0, 4.0, 6.0], dtype=BF16))
    y = torch.tensor([0.5, 1.5], requires_grad=True)
    a, b = _SharedCast.apply(y, BF16), _SharedCast.apply(y, BF16)
    (a.float() * 3 + b.float() * 5).sum().backward()
    assert y.grad.dtype == torch.float32 and torch.equal(y.grad, torch.tensor([8.0, 8.0]))


@pytest.mark.parametrize(("native", "amx", "chosen"), [(False, False, EmulatedBf16Matmuls),
                                                       (True, False, EmulatedBf16Attention), (True, True, None)])
def test_compute_kernels_emulates_what_the_cpu_runs_slowly(monkeypatch, native, amx, chosen):
    """Without bf16 units every bf16 kernel is emulated; with AVX-512-BF16 and no AMX only attention (its fp32
    kernel is faster there); with AMX nothing. ``kernel_choice`` names the choice (the reference cache keys on it). Emulated attention is exactly fp32 attention of the bf16
    operands, rounded to bf16; products outside attention stay PyTorch's own."""
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda device: native)
    monkeypatch.setattr(precision, "amx", lambda device: amx)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 16).to(BF16) for _ in range(3))
    a, b = torch.randn(20, 30).to(BF16), torch.randn(30, 10).to(BF16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert precision.kernel_choice("bf16", "cpu") == {EmulatedBf16Matmuls: "emulated", None: "native",
                                                     EmulatedBf16Attention: "fp32 attention"}[chosen]
    with precision.compute_kernels("bf16", "cpu"):
        active = {cls: cls._active for cls in (EmulatedBf16Matmuls, EmulatedBf16Attention)}
        attended, product = sdpa(q, k, v, is_causal=True), a @ b
    assert active == {cls: int(cls is chosen) for cls in active}
    if chosen is not None:
        expected = sdpa(q.float(), k.float(), v.float(), is_causal=True).to(BF16)
        assert torch.equal(attended, expected)
    if chosen is EmulatedBf16Attention:
        assert torch.equal(product, a @ b)
