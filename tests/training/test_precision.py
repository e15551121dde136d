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
from preftune.training import logps
from preftune.training.logps import completion_logps
from preftune.training.precision import (
    EmulatedBf16Matmuls,
    restore_frozen_linears,
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


def test_a_frozen_head_tied_to_the_embeddings_is_cast_to_bf16_once_per_forward(monkeypatch):
    """LoRA on a tiny Llama whose LM head is its frozen fp32 embedding (tied, so it stays fp32), 3 positions per
    chunk: 4 rows x 8 scored positions = 32 positions, ceil(32 / 3) = 11 chunks. Autocast alone casts the
    512 x 64 head weight at each chunk's forward and again at its recomputation in backward: 22 casts. preftune
    casts it once for the call, and the log-probs and LoRA gradients are bitwise the same."""
    base = tiny_llama(seed=0)
    base.config.tie_word_embeddings = True
    base.lm_head.weight = base.model.embed_tokens.weight
    model = add_lora(base, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    ids, attention, completion = _batch()
    results = {}
    for name in ("per chunk", "once"):
        if name == "per chunk":  # what autocast does with the head itself
            monkeypatch.setattr(logps, "_chunk_head", lambda head, device: head)
        else:
            monkeypatch.undo()
        model.zero_grad(set_to_none=True)
        with _CastsOf((512, 64)) as casts:
            with torch.autocast("cpu", dtype=BF16):
                out = completion_logps(model, ids, attention, completion, chunk_size=3)
            out.sums.sum().backward()
        results[name] = casts.count, out.token_logps.detach(), layer_grad(model).clone()
    (chunked, logps_a, grad_a), (once, logps_b, grad_b) = results["per chunk"], results["once"]
    assert (chunked, once) == (22, 1)
    assert torch.equal(logps_a, logps_b) and torch.equal(grad_a, grad_b)
