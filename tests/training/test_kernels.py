"""fp32 products through oneDNN (``kernels.OnednnProducts``): which products it takes, that they are fp32
products of the same operands (checked against float64), that everything else is PyTorch's kernel bitwise,
and that a run picks it (or not) as documented."""

from __future__ import annotations

import platform

import pytest
import torch

from preftune.testing import tiny_llama
from preftune.training import kernels, precision
from preftune.training.kernels import OnednnProducts
from preftune.training.logps import completion_logps

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                                or not torch.backends.mkldnn.is_available(), reason="oneDNN products: x86 CPUs")


@pytest.fixture
def taken(monkeypatch):
    """The first operand's shape of every product the swap hands to oneDNN."""
    shapes, onednn = [], kernels._onednn

    def spy(a, weight, bias=None):
        shapes.append(tuple(a.shape))
        return onednn(a, weight, bias)

    monkeypatch.setattr(kernels, "_onednn", spy)
    return shapes


def _close_to_float64(value, expected):
    """An fp32 sum of 256 products of N(0,1) numbers (results up to ~60): its rounding error is ~1e-5 (measured
    4e-5 at most); allowed 1e-5 of the largest result (~6e-4), while one wrong or missing term (~1) is not."""
    assert value.dtype == torch.float32
    assert (value.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_linear_layer_products_go_to_onednn_and_are_fp32_products(taken):
    torch.manual_seed(0)
    a, b, weight, bias = torch.randn(300, 256), torch.randn(256, 512), torch.randn(512, 256), torch.randn(512)
    out = torch.empty(300, 512)
    with OnednnProducts():
        forward, transposed = a @ b, a @ weight.t()  # b contiguous; weight.t(): the layout of x @ W^T
        with_bias, into = torch.addmm(bias, a, b), torch.mm(a, b, out=out)
    assert taken == [(300, 256)] * 4 and into is out
    _close_to_float64(forward, a.double() @ b.double())
    _close_to_float64(transposed, a.double() @ weight.double().t())
    _close_to_float64(with_bias, a.double() @ b.double() + bias.double())
    _close_to_float64(out, a.double() @ b.double())


def test_other_products_stay_pytorchs_bitwise(taken):
    """Weight gradients (a transposed first operand), small products, scaled addmm, bf16: PyTorch's kernel."""
    torch.manual_seed(1)
    grad, x = torch.randn(600, 512), torch.randn(600)
    small_a, small_b = torch.randn(16, 256), torch.randn(256, 256)  # 1M multiply-adds < MIN_MACS
    a, b, c = torch.randn(300, 256), torch.randn(256, 512), torch.randn(300, 512)
    ha, hb = a.bfloat16(), b.bfloat16()
    cases = {"weight gradient": lambda: grad.t() @ x, "small": lambda: small_a @ small_b,
             "scaled addmm": lambda: torch.addmm(c, a, b, beta=0.5, alpha=2.0), "bf16": lambda: ha @ hb}
    plain = {name: f() for name, f in cases.items()}
    with OnednnProducts():
        swapped = {name: f() for name, f in cases.items()}
    assert taken == []
    for name in cases:
        assert torch.equal(swapped[name], plain[name]), name
    assert OnednnProducts._active == 0 and torch.equal(a @ b, torch.mm(a, b))


def test_a_tiny_llama_forward_and_backward_match_pytorchs_kernels(taken, monkeypatch):
    """Log-probs and gradients of a 2-layer Llama (hidden 64, 2 x 24 tokens: 48 x 64 x 256 = 786k
    multiply-adds per MLP product, so ``MIN_MACS`` is lowered to take them) under the swap against PyTorch's
    kernels: to float rounding (log-probs 1e-5 relative, gradients 1e-4 of each tensor's largest entry)."""
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=300)
    ids = torch.randint(3, 300, (2, 24))
    attention, completion = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 10:] = True

    def run():
        model.zero_grad()
        sums = completion_logps(model, ids, attention, completion).sums
        sums.sum().backward()
        return sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_sums, plain_grads = run()
    monkeypatch.setattr(kernels, "MIN_MACS", 1 << 16)
    with OnednnProducts():
        sums, grads = run()
    assert len(taken) > 10  # q, k, v, o, MLP and head products, forward and input gradients
    assert torch.allclose(sums, plain_sums, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        scale = plain_grads[name].abs().max()
        assert (grad - plain_grads[name]).abs().max() <= 1e-4 * scale, name


def test_kernel_choice_for_fp32(monkeypatch):
    """fp32 on an x86 CPU: oneDNN when it has AVX-512 (``auto``) or ``PREFTUNE_CPU_MATMUL=onednn``, never with
    ``pytorch``; a bad value names the variable; a GPU keeps PyTorch's; ``compute_kernels`` enters the swap
    for that choice only."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    for avx512, setting, expected in ((True, None, "onednn"), (False, None, "native"), (False, "onednn", "onednn"),
                                      (True, "pytorch", "native"), (True, " Auto ", "onednn")):
        monkeypatch.setattr(kernels, "_avx512", lambda avx512=avx512: avx512)
        if setting is None:
            monkeypatch.delenv(kernels.ENV, raising=False)
        else:
            monkeypatch.setenv(kernels.ENV, setting)
        assert precision.kernel_choice("fp32", "cpu") == expected, (avx512, setting)
        assert precision.kernel_choice("fp32", "cuda") == "native"
        with precision.compute_kernels("fp32", "cpu"):
            assert OnednnProducts._active == int(expected == "onednn")
        assert OnednnProducts._active == 0
    monkeypatch.setenv(kernels.ENV, "mkl")
    with pytest.raises(ValueError, match="PREFTUNE_CPU_MATMUL='mkl': expected one of auto, onednn, pytorch"):
        precision.kernel_choice("fp32", "cpu")


def test_fused_adamw_where_the_parameters_allow_it():
    """Plain CPU floating-point parameters take the fused kernel; sharded runs, empty and integer parameter
    lists do not. Five fused steps land where five ``foreach`` steps do, to float rounding (each moves a
    weight by at most lr = 1e-2, so 1e-6 is ~1e-4 of a step; a wrong bias correction or decay is ~1e-3)."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    groups = [{"params": weights}]
    assert kernels.fused_adamw(groups, sharded=False)
    assert not kernels.fused_adamw(groups, sharded=True)
    assert not kernels.fused_adamw([{"params": []}], sharded=False)
    assert not kernels.fused_adamw([{"params": [torch.zeros(3, dtype=torch.long)]}], sharded=False)
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.1, fused=True)
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, foreach=True)
    for _ in range(5):
        grads = [torch.randn_like(w) for w in weights]
        for w, c, g in zip(weights, copies, grads, strict=True):
            w.grad, c.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for w, c in zip(weights, copies, strict=True):
        assert (w - c).abs().max() <= 1e-6
