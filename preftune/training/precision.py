"""bf16 that uses the hardware: frozen weights stored in bf16, and bf16 matmuls on whatever units compute them.

``training.precision: bf16`` is bf16 autocast (accelerate's): trainable weights stay fp32 (the optimizer's
master copy) and every matmul-class op (linear, matmul, attention) runs on bf16 operands with fp32
accumulation. What makes that fast or slow on a given machine:

- **Frozen linear weights** (LoRA's base model, a frozen reference) are cast to bf16 by autocast at every
  call, forward and backward, and held in fp32 meanwhile. Under bf16 they are stored in bf16 once
  (``store_frozen_linears_in_bf16``): the same numbers reach the matmuls (autocast would round them to bf16
  anyway), with half the memory and no casts. Only ``nn.Linear`` weights qualify: an embedding (possibly
  tied to the LM head) or a norm weight is read in fp32 by autocast, so it keeps its dtype; the log-prob
  path casts a frozen head tied to the embedding once and keeps the copy (``kept_cast``).
- **CPUs without bf16 matrix units** (no AVX-512-BF16 / AMX: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
  is false, e.g. AVX2-only x86) run PyTorch's bf16 matmuls in a generic kernel measured 5-40x slower than the
  fp32 one. There, ``emulated_bf16_matmuls`` computes each matmul-class op as a native bf16 kernel does
  (operands rounded to bf16, products accumulated in fp32, the result rounded to bf16), on the fp32 units.
  The rounding of operands and results is autocast's; only the order of the fp32 summation differs, and
  inside attention the probabilities stay fp32 (the bf16 kernel rounds them before the second product).
  Forward and backward kernels alike; autograd still saves autocast's bf16 tensors.
- **CPUs with AVX-512-BF16 but no AMX** multiply bf16 matrices 2.3x faster than fp32 (GEMM peaks of 429 and
  190 GFLOP/s on 2 threads of an AMD EPYC), but PyTorch's bf16 flash-attention kernels are slower than the
  fp32 ones with the casts around them (backward of a 100-token SmolLM2 block: 1.6 ms against 1.2). There only
  attention is emulated as above: a SmolLM2 LoRA forward + backward of 8 rows takes 10% less time (median of
  4 alternating runs, 3.10 s against 2.81), and its log-probs and gradients are as far from fp32's as the
  native kernels' (median relative gradient error 1.8% against 1.9%). With AMX, PyTorch's kernels run all.
- **One bf16 copy per activation** (``share_input_casts``): autocast casts a linear layer's fp32 input to bf16
  at every call, so the normed hidden state that feeds q, k and v (with LoRA: each base layer and each
  adapter) is copied six times, and the MLP's input four. preftune makes that copy once per tensor and
  version and hands it to every such call; each call keeps its own cast node, whose backward casts the
  gradient back to fp32 as autocast's does, so the gradients are summed in fp32 in the same way and every
  value is bitwise the same. PEFT's LoRA layers cast a bf16 input up to their fp32 adapter's dtype, which
  autocast then casts straight back; with no adapter dropout that round trip is skipped (also exact).

``compute_kernels(precision, device)`` enters what the machine needs for the whole run (forward, backward and
the recomputation that gradient checkpointing does inside backward), in fp32 too: there, on x86 CPUs with
AVX-512, the products of linear layers go through oneDNN (``kernels.OnednnProducts``); ``prepare_for_bf16(model)``
stores and shares as above.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .kernels import OnednnProducts, SwappedKernels, onednn_fp32

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


def amx(device: torch.device | str) -> bool:
    """Whether ``device`` is a CPU with AMX tiles (PyTorch's bf16 attention kernels run on them)."""
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # not in every PyTorch release
    return torch.device(device).type == "cpu" and supported is not None and bool(supported())


_aten = torch.ops.aten
# matmul-class kernels autocast runs in bf16 -> which of their outputs a native bf16 kernel returns in fp32
_KERNELS = {
    _aten.mm.default: (), _aten.addmm.default: (), _aten.bmm.default: (), _aten.baddbmm.default: (),
    _aten.addbmm.default: (),
    _aten._scaled_dot_product_flash_attention_for_cpu.default: (1,),  # (out, logsumexp): logsumexp is fp32
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (),
}
_ATTENTION = {op: outputs for op, outputs in _KERNELS.items() if "attention" in op.name()}


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


class EmulatedBf16Matmuls(SwappedKernels):
    """bf16 matmul kernels computed on fp32 units (see the module docstring), while inside (re-entrant).

    It replaces the CPU kernels of the matmul-class ops (``_KERNELS``) and nothing else (``kernels.SwappedKernels``:
    below autograd and autocast, so what autograd saves, what gradient checkpointing recomputes and every
    rounding to bf16 stay autocast's; only the kernel that multiplies changes); fp32 calls pass through."""

    KERNELS = _KERNELS
    _active = 0
    _library = None

    @classmethod
    def replacement(cls, op, kernel, fp32_outputs):
        return _emulating(kernel, fp32_outputs)


class EmulatedBf16Attention(EmulatedBf16Matmuls):
    """Only the attention kernels emulated (CPUs with AVX-512-BF16 and no AMX: see the module docstring)."""

    KERNELS = _ATTENTION
    _active = 0
    _library = None


def _tied_to_embeddings(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` holding an ordinary floating-point weight: quantized layers (bitsandbytes'
    ``Linear4bit`` / ``Linear8bitLt`` subclass ``nn.Linear`` with packed integer weights) are not."""
    return (isinstance(module, nn.Linear) and type(module.weight) is nn.Parameter
            and module.weight.is_floating_point())


def _plain_linears(model: nn.Module) -> Iterator[nn.Linear]:
    return (module for module in model.modules() if _is_plain_linear(module))


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


_KEPT_CASTS = WeakIdKeyDictionary()  # tensor -> ((storage, version, dtype), its copy, the copy's version)


def kept_cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, made once and kept while ``x``'s storage and version and the copy itself are unchanged
    (an in-place update of ``x``, a swapped ``.data`` or a write into the copy makes a new one). Serves the
    activations' shared casts (``_SharedCast``) and a frozen LM head tied to the fp32 embedding
    (``head_logprobs.linear_head``): under bf16 every forward cast SmolLM2's 49,152 x 576 again, the policy's
    and the reference's, 20-80 ms each on a 2-core CPU (most of it faulting in the fresh 57 MB), for the price
    of keeping one bf16 copy. Not kept under inference mode (an inference tensor cannot be saved for a later
    backward). Sharded weights never come here: ``linear_head`` passes by ZeRO-3's and FSDP2's (accelerate
    makes the head a unit of its own, whose class is no longer ``nn.Linear``; FSDP2 refills gathered weights
    without bumping their version)."""
    if x.dtype == dtype:
        return x
    if torch.is_inference_mode_enabled():
        return x.to(dtype)
    key = (x.data_ptr(), x._version, dtype)
    kept = _KEPT_CASTS.get(x)
    if kept is None or kept[0] != key or kept[1]._version != kept[2]:
        cast = x.detach().to(dtype)
        kept = _KEPT_CASTS[x] = (key, cast, cast._version)
    return kept[1]


class _SharedCast(torch.autograd.Function):
    """``x.to(dtype)`` made once per tensor and version (``kept_cast``) and shared by every call. Each call is
    its own autograd node whose backward casts the gradient back to ``x``'s dtype, as autocast's cast does."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.source = x.dtype
        return kept_cast(x, dtype).detach()  # a tensor of its own over the one copy: each call its own node

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.source), None


def _autocast_dtype(x: object) -> torch.dtype | None:
    """The dtype autocast would cast ``x`` to for a linear layer, or None if it leaves it alone."""
    if (not isinstance(x, Tensor) or x.dtype != torch.float32 or x.is_inference()
            or torch.is_inference_mode_enabled()):  # a copy made there could not be saved for backward later
        return None
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _cast_input_once(module: nn.Module, args: tuple):
    dtype = _autocast_dtype(args[0] if args else None)
    if dtype is not None:
        return (_SharedCast.apply(args[0], dtype), *args[1:])
    return None


def _lora_input_cast(module: nn.Module, args: tuple) -> None:
    """PEFT casts a LoRA layer's input to the adapter's fp32 before autocast casts it back: skip that when the
    input already has the autocast dtype (the adapters have no dropout: the round trip changes nothing)."""
    x = args[0] if args else None
    if isinstance(x, Tensor):
        kind = x.device.type
        module.cast_input_dtype_enabled = not (torch.is_autocast_enabled(kind)
                                               and x.dtype == torch.get_autocast_dtype(kind))


def share_input_casts(model: nn.Module) -> int:
    """Under autocast, every plain ``nn.Linear`` of ``model`` gets the one shared bf16 copy of its fp32 input,
    and PEFT LoRA layers without dropout skip their cast-up of a bf16 input (module docstring). Returns how
    many layers were set up; calling it again adds nothing."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if getattr(module, "_preftune_shared_cast", False):
            continue
        if _is_plain_linear(module):
            hook = _cast_input_once
        elif type(module) is LoraLinear and not module.lora_variant and all(
                isinstance(d, nn.Identity) for d in module.lora_dropout.values()):
            hook = _lora_input_cast
        else:
            continue
        module.register_forward_pre_hook(hook)
        module._preftune_shared_cast = True
        count += 1
    return count


def prepare_for_bf16(model: nn.Module) -> int:
    """``store_frozen_linears_in_bf16`` and ``share_input_casts``; returns how many parameters moved to bf16."""
    moved = store_frozen_linears_in_bf16(model)
    share_input_casts(model)
    return moved


def kernel_choice(precision: str, device: torch.device | str) -> str:
    """Which kernels ``compute_kernels`` runs a ``precision`` run's products with on ``device``. bf16: ``native``,
    ``fp32 attention`` (AVX-512-BF16 without AMX) or ``emulated`` (no bf16 units); fp32: ``onednn``
    (``kernels.OnednnProducts``, where ``kernels.onednn_fp32`` says: x86 CPUs with AVX-512 by default) or ``native``. Their numbers differ in the last bits, so whatever caches
    computed values (the reference log-probs) keys on this."""
    device = torch.device(device)
    if precision != "bf16":
        return "onednn" if precision == "fp32" and onednn_fp32(device) else "native"
    if device.type != "cpu" or amx(device):
        return "native"
    return "fp32 attention" if native_bf16_matmul(device) else "emulated"


_KERNEL_SWAPS = {"native": contextlib.nullcontext, "fp32 attention": EmulatedBf16Attention,
                 "emulated": EmulatedBf16Matmuls, "onednn": OnednnProducts}


@contextlib.contextmanager
def compute_kernels(precision: str, device: torch.device | str) -> Iterator[None]:
    """The kernels ``kernel_choice`` names, for everything run inside (forward, backward, the recomputation
    that gradient checkpointing does inside backward, reference precomputation, evaluation)."""
    with _KERNEL_SWAPS[kernel_choice(precision, device)]():
        yield
