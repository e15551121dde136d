"""CPU kernels swapped below autograd while a run computes, and the fp32 products that go to oneDNN.

``SwappedKernels`` replaces the CPU kernels of a few ATen ops for as long as one is entered (re-entrant,
process-wide: other threads' calls go through the replacement too, which hands back to PyTorch's kernel what
it does not take). It sits below autograd and autocast, so what autograd saves, what gradient checkpointing
recomputes and every dtype autocast picks stay theirs; only the kernel that computes changes. Only these ops
reach Python: a dispatch mode would see every op of a step (measured: 13% of a SmolLM2 LoRA forward +
backward went to that). ``precision.EmulatedBf16Matmuls`` is one; ``OnednnProducts`` another.

**fp32 products through oneDNN** (``OnednnProducts``). PyTorch multiplies fp32 matrices on x86 CPUs with
MKL's sgemm; oneDNN, which PyTorch ships too (``torch.compile`` uses it for frozen CPU linears, preftune's
decoding for every linear layer), multiplies the ones of a linear layer faster on the CPU measured. 2 threads
of an AMD EPYC with AVX-512, fp32, best of 3, GFLOP/s of MKL -> oneDNN for an activation ``[M, K]`` times an
``[N, K]`` weight, as forward ``x W^T`` / input gradient ``g W``:

- M x K x N = 5000 x 256 x 1024: 172 -> 190 / 186 -> 218; 5000 x 1024 x 256: 191 -> 213 / 179 -> 211
- 1000 x 256 x 8192 (an LM head): 147 -> 186 / 186 -> 192; 1000 x 576 x 1536: 177 -> 190 / 187 -> 207
- 256 x 576 x 1536: 178 -> 203 / 183 -> 215; 64 x 256 x 8192: 71 -> 143 / 127 -> 191

and, alternating the two from step to step in one process, a tiny Llama's DPO step (4 layers, hidden 256, 8k
vocabulary, fp32 forward + backward with the reference): 7% less time with 96-token completions (medians
0.852 -> 0.788 s over 14 steps each), 12% with 500-token prompts (1.97 -> 1.72 s over 11; oneDNN faster in
every pair). The weight gradients ``g^T x`` (first operand a transposed activation, inner dimension the token
count) were slower through oneDNN (114 against 159 GFLOP/s), and so were products under ~4M multiply-adds
(16 x 256 x 256: 58 against 80): those stay MKL's. So a product goes to oneDNN's inner product
(``mkldnn._linear_pointwise``, whose weight operand may be transposed) when both operands are fp32, the first
is contiguous, the second contiguous or transposed-contiguous, and it has at least ``MIN_MACS``
multiply-adds; everything else is PyTorch's kernel, untouched. The numbers are fp32 products (oneDNN's
default, strict fp32 math mode) summed in another order: the same to float rounding, not bitwise.

Without AVX-512 it is not a clear win: with oneDNN held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) on the same CPU,
the tiny Llama's big products were still faster (157 -> 195 forward) but SmolLM2's slower (1000 x 576 x 1536:
186 -> 167; 64 x 256 x 8192: 110 -> 100). So a run enters it (``precision.compute_kernels``) for fp32 on x86
CPUs with AVX-512; ``PREFTUNE_CPU_MATMUL`` in the environment overrides that: ``onednn`` on any x86 CPU,
``pytorch`` never (``auto``, the default, is the rule above). The reference cache keys on the choice.
"""

from __future__ import annotations

import os
import platform
import warnings

import torch
from torch import Tensor

_aten = torch.ops.aten
F32 = torch.float32
MIN_MACS = 1 << 22  # multiply-adds below which MKL was as fast or faster (see the module docstring)
ENV = "PREFTUNE_CPU_MATMUL"
CHOICES = ("auto", "onednn", "pytorch")


class SwappedKernels:
    """While inside (re-entrant), the CPU kernel of each op in ``KERNELS`` is ``replacement(op, kernel, extra)``
    (``kernel``: the one PyTorch registered; ``extra``: the op's value in ``KERNELS``); PyTorch's kernels come
    back on the last exit. A subclass sets ``KERNELS`` and ``replacement`` and its own ``_active``/``_library``."""

    KERNELS: dict = {}
    _active = 0
    _library = None

    @classmethod
    def replacement(cls, op, kernel, extra):
        raise NotImplementedError

    def __enter__(self):
        cls = type(self)
        if cls._active == 0:
            library = torch.library.Library("aten", "IMPL")
            with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
                warnings.simplefilter("ignore")
                for op, extra in cls.KERNELS.items():
                    kernel = torch.library.get_kernel(op, "CPU")
                    library.impl(op, cls.replacement(op, kernel, extra), "CPU", with_keyset=True)
            cls._library = library
        cls._active += 1
        return self

    def __exit__(self, *exc) -> None:
        cls = type(self)
        cls._active -= 1
        if cls._active == 0:
            cls._library._destroy()
            cls._library = None


def onednn_weight(a: Tensor, b: Tensor) -> Tensor | None:
    """``b.t()`` as the ``[N, K]`` weight of oneDNN's inner product for ``a @ b``, or None when the product
    stays PyTorch's (module docstring: dtypes, layouts, size)."""
    if (a.dtype != F32 or b.dtype != F32 or a.dim() != 2 or b.dim() != 2 or not a.is_contiguous()
            or a.shape[0] * a.shape[1] * b.shape[1] < MIN_MACS):
        return None
    weight = b.t()
    return weight if weight.is_contiguous() or b.is_contiguous() else None


def _onednn(a: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [], "")


def _mm(kernel):
    def mm(keyset, a, b):
        weight = onednn_weight(a, b)
        return kernel.call_boxed(keyset, a, b) if weight is None else _onednn(a, weight)
    return mm


def _mm_out(kernel):
    def mm_out(keyset, a, b, *, out):
        weight = onednn_weight(a, b)
        if weight is None or out.shape != (a.shape[0], b.shape[1]) or out.dtype != F32:
            return kernel.call_boxed(keyset, a, b, out=out)
        return out.copy_(_onednn(a, weight))  # a copy of the result is cheap next to the product it follows
    return mm_out


def _addmm(kernel):
    def addmm(keyset, bias, a, b, *, beta=1, alpha=1):
        weight = onednn_weight(a, b)
        if (weight is None or beta != 1 or alpha != 1 or bias.dtype != F32 or bias.dim() != 1
                or bias.shape[0] != b.shape[1]):
            return kernel.call_boxed(keyset, bias, a, b, beta=beta, alpha=alpha)
        return _onednn(a, weight, bias.contiguous())
    return addmm


class OnednnProducts(SwappedKernels):
    """fp32 matrix products through oneDNN where it was faster (module docstring), PyTorch's kernel elsewhere."""

    KERNELS = {_aten.mm.default: _mm, _aten.mm.out: _mm_out, _aten.addmm.default: _addmm}
    _active = 0
    _library = None

    @classmethod
    def replacement(cls, op, kernel, extra):
        return extra(kernel)


def cpu_matmul() -> str:
    """``PREFTUNE_CPU_MATMUL`` from the environment: ``auto`` (the default), ``onednn`` or ``pytorch``."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"environment variable {ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)} "
                         "(auto: fp32 products of linear layers through oneDNN on x86 CPUs with AVX-512; onednn: on "
                         "any x86 CPU; pytorch: PyTorch's own kernels)")
    return value


def _avx512() -> bool:
    supported = getattr(torch.cpu, "_is_avx512_supported", None)  # not in every PyTorch release
    return supported is not None and bool(supported())


def onednn_fp32(device: torch.device | str) -> bool:
    """Whether fp32 products on ``device`` go through oneDNN: an x86 CPU whose PyTorch has oneDNN, with AVX-512
    unless ``PREFTUNE_CPU_MATMUL=onednn`` (module docstring), and never with ``PREFTUNE_CPU_MATMUL=pytorch``."""
    choice = cpu_matmul()
    return (choice != "pytorch" and torch.device(device).type == "cpu"
            and platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and (choice == "onednn" or _avx512()))


def fused_adamw(groups: list[dict], sharded: bool) -> bool:
    """Whether AdamW can take PyTorch's fused kernel (``fused=True``: one pass over each parameter's weight,
    gradient and moments, where the default ``foreach`` path runs about ten elementwise ops over lists of
    them): every parameter a plain floating-point tensor on a CPU or CUDA device, and not ``sharded`` (FSDP2's
    DTensors and DeepSpeed's partitions are theirs to step). A tiny Llama's 8.4M parameters on 2 CPU threads:
    17-30 -> 5 ms a step. The same update to float rounding (2e-7 apart after 5 steps, 1e-3 learning rate)."""
    params = [p for group in groups for p in group["params"]]
    return not sharded and bool(params) and all(
        type(p) in (Tensor, torch.nn.Parameter) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params)
