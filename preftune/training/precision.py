"""bf16 that uses the hardware: frozen weights stored in bf16, and bf16 matmuls on whatever units compute them.

``training.precision: bf16`` is bf16 autocast (accelerate's): trainable weights stay fp32 (the optimizer's
master copy) and every matmul-class op (linear, matmul, attention) runs on bf16 operands with fp32
accumulation. Two things make that fast or slow on a given machine:

- **Frozen linear weights** (LoRA's base model, a frozen reference) are cast to bf16 by autocast at every
  call, forward and backward, and held in fp32 meanwhile. Under bf16 they are stored in bf16 once
  (``store_frozen_linears_in_bf16``): the same numbers reach the matmuls (autocast would round them to bf16
  anyway), with half the memory and no casts. Only ``nn.Linear`` weights qualify: an embedding (possibly
  tied to the LM head) or a norm weight is read in fp32 by autocast, so it keeps its dtype; the log-prob
  path casts a frozen head tied to the embedding once per forward (``logps._chunk_head``).
- **CPUs without bf16 matrix units** (no AVX-512-BF16 / AMX: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
  is false, e.g. AVX2-only x86) run PyTorch's bf16 matmuls in a generic kernel measured 5-40x slower than the
  fp32 one. There, ``emulated_bf16_matmuls`` computes each matmul-class op as a native bf16 kernel does
  (operands rounded to bf16, products accumulated in fp32, the result rounded to bf16), on the fp32 units.
  The rounding of operands and results is autocast's; only the order of the fp32 summation differs, and
  inside attention the probabilities stay fp32 (the bf16 kernel rounds them before the second product).
  Forward and backward kernels alike; autograd still saves autocast's bf16 tensors.

``bf16_compute(precision, device)`` enters what the machine needs for the whole run (forward, backward and
the recomputation that gradient checkpointing does inside backward).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

log = logging.getLogger("preftune")
BF16 = torch.bfloat16


def native_bf16_matmul(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (CUDA with bf16, x86 with AVX-512 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


_aten = torch.ops.aten
# matmul-class kernels autocast runs in bf16 -> which of their outputs a native bf16 kernel returns in fp32
_KERNELS = {
    _aten.mm.default: (), _aten.addmm.default: (), _aten.bmm.default: (), _aten.baddbmm.default: (),
    _aten.addbmm.default: (),
    _aten._scaled_dot_product_flash_attention_for_cpu.default: (1,),  # (out, logsumexp): logsumexp is fp32
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (),
}


def _up(value):
    if isinstance(value, Tensor) and value.dtype == BF16:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_up(v) for v in value)
    return value


def _emulating(kernel, fp32_outputs: tuple[int, ...]):
    """A CPU kernel that runs ``kernel`` (the one PyTorch registered) on fp32 copies of any bf16 operands and
    rounds the results to bf16, except outputs a native bf16 kernel returns in fp32; fp32 calls pass through."""

    def emulated(keyset, *args, **kwargs):
        if not any(isinstance(a, Tensor) and a.dtype == BF16 for a in args):
            return kernel.call_boxed(keyset, *args, **kwargs)
        out = kernel.call_boxed(keyset, *_up(args), **{k: _up(v) for k, v in kwargs.items()})
        if isinstance(out, Tensor):
            return out.to(BF16)
        return type(out)(o if i in fp32_outputs or not isinstance(o, Tensor) else o.to(BF16) for i, o in enumerate(out))

    return emulated


class EmulatedBf16Matmuls:
    """bf16 matmul kernels computed on fp32 units (see the module docstring), while inside (re-entrant).

    It replaces the CPU kernels of the matmul-class ops (``_KERNELS``) and nothing else: below autograd and
    autocast, so what autograd saves, what gradient checkpointing recomputes and every rounding to bf16 stay
    autocast's; only the kernel that multiplies changes. The replacement is process-wide while any is
    active (other threads' fp32 products pass through unchanged), and PyTorch's kernels come back on exit.
    Only these few ops reach Python: a dispatch mode would see every op of the step (measured: 13% of a
    SmolLM2 LoRA forward + backward went to that)."""

    _active = 0
    _library = None

    def __enter__(self) -> EmulatedBf16Matmuls:
        cls = type(self)
        if cls._active == 0:
            library = torch.library.Library("aten", "IMPL")
            with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
                warnings.simplefilter("ignore")
                for op, fp32_outputs in _KERNELS.items():
                    kernel = torch.library.get_kernel(op, "CPU")
                    library.impl(op, _emulating(kernel, fp32_outputs), "CPU", with_keyset=True)
            cls._library = library
        cls._active += 1
        return self

    def __exit__(self, *exc) -> None:
        cls = type(self)
        cls._active -= 1
        if cls._active == 0:
            cls._library._destroy()
            cls._library = None


def _tied_to_embeddings(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _plain_linears(model: nn.Module) -> Iterator[nn.Linear]:
    """``nn.Linear`` modules holding ordinary floating-point weights: quantized layers (bitsandbytes'
    ``Linear4bit`` / ``Linear8bitLt`` subclass ``nn.Linear`` with packed integer weights) are left alone."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and type(module.weight) is nn.Parameter and module.weight.is_floating_point():
            yield module


def store_frozen_linears_in_bf16(model: nn.Module) -> int:
    """Frozen ``nn.Linear`` weights (and biases) not shared with an embedding -> bf16, in place; returns how
    many parameters moved. Autocast would have rounded every one of them to bf16 at each use."""
    embedded, moved = _tied_to_embeddings(model), 0
    for module in _plain_linears(model):
        for param in (module.weight, module.bias):
            if param is None or param.requires_grad or id(param) in embedded or param.dtype == BF16:
                continue
            param.data = param.data.to(BF16)
            moved += param.numel()
    return moved


def restore_frozen_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Undo ``store_frozen_linears_in_bf16`` (before merging adapters into the base, which must not round)."""
    for module in _plain_linears(model):
        for param in (module.weight, module.bias):
            if param is not None and not param.requires_grad and param.dtype == BF16 and dtype != BF16:
                param.data = param.data.to(dtype)


@contextlib.contextmanager
def bf16_compute(precision: str, device: torch.device | str) -> Iterator[None]:
    """What bf16 needs on ``device`` for everything run inside (see the module docstring); nothing for fp32."""
    if precision != "bf16" or native_bf16_matmul(device) or torch.device(device).type != "cpu":
        yield
        return
    with EmulatedBf16Matmuls():
        yield
