"""The sharding engines a launch asks for, completed where accelerate leaves a gap, and set up for preftune's
loop. accelerate (1.15) grants FSDP and DeepSpeed to GPU-class devices only: on CPU processes an FSDP or
DeepSpeed launch comes up as plain processes (MULTI_CPU). torch's FSDP2 and DeepSpeed's CPU accelerator both
run over gloo, so the set-up the launch exported (``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` and
their settings) is turned on here the way accelerate turns it on for a GPU; the rest is accelerate's own
preparation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch


def asked(engine: str) -> bool:
    """Whether the launch asked for ``engine`` ("fsdp", "deepspeed"): ``accelerate launch`` exports its set-up."""
    return os.environ.get(f"ACCELERATE_USE_{engine.upper()}", "false").lower() == "true"


def complete_launch(accelerator, mixed: str) -> None:
    """After ``Accelerator(...)``: FSDP2 or DeepSpeed on CPU processes when the launch asked for them, and
    FSDP2's mixed precision as preftune needs it."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        granted = None
        if asked("fsdp"):
            from accelerate import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch exported
            if plugin.fsdp_version == 2:  # FSDP1 is left to accelerate's own rule (and refused by the loop)
                accelerator.state.fsdp_plugin, granted = plugin, DistributedType.FSDP
        elif asked("deepspeed") and importlib.util.find_spec("deepspeed") is not None:  # else the loop says so
            from accelerate import DeepSpeedPlugin

            plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables
            plugin.set_mixed_precision(mixed)
            plugin.select(_from_accelerator_state=True)
            accelerator.state.deepspeed_plugins, granted = plugin, DistributedType.DEEPSPEED
            accelerator.deepspeed_engine_wrapped = None
        if granted is not None:
            accelerator.state.distributed_type = granted
            PartialState._shared_state["distributed_type"] = granted  # as accelerate's own set-up records it
    _fsdp_mixed_precision(accelerator, mixed)


def _fsdp_mixed_precision(accelerator, mixed: str) -> None:
    """FSDP2 with bf16/fp16: the weights are gathered and multiplied in the low precision, but gradients are
    reduced and every unit's output returned in fp32. accelerate's own policy casts outputs and the gradient
    reduction to the low precision too, which would round a completion's summed log-prob (a few hundred nats)
    to bf16's step of 1-2 nats, far above the margins DPO learns from."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if mixed == "no" or accelerator.distributed_type != DistributedType.FSDP or getattr(plugin, "fsdp_version", 1) != 2:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed]
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def zero3_launch(accelerator) -> bool:
    """DeepSpeed ZeRO-3: the weights themselves are split across processes."""
    return is_deepspeed(accelerator) and zero_stage(accelerator) == 3


def configure_deepspeed(accelerator, batch_size: int, max_grad_norm: float | None) -> None:
    """DeepSpeed's batch and clipping settings from the run's own: preftune deals the rows and weights the
    micro-batches itself, so DeepSpeed sees one micro-batch of ``batch_size`` per process and no accumulation
    of its own (the loop marks the last micro-batch of each step as DeepSpeed's step boundary); it clips at
    ``training.max_grad_norm``."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    world = accelerator.num_processes
    config.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=1,
                  train_batch_size=batch_size * world, gradient_clipping=float(max_grad_norm or 0.0))


@contextlib.contextmanager
def loading_whole():
    """Inside, models that transformers loads are whole on this process. Under a DeepSpeed ZeRO-3 launch it
    would split each across processes as it loads (DeepSpeed's ``zero.Init``, a collective): the main
    process alone loading a base to merge an adapter into would wait for the others forever."""
    from transformers.integrations import deepspeed as hf_deepspeed

    active = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active


def prepare_frozen(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """A frozen model (the reference, wrapped so that one forward is one use of it) under DeepSpeed ZeRO-3
    like the policy: its weights split across processes and gathered layer by layer in each forward, so no
    process holds it whole. Returns DeepSpeed's engine; its forwards are collective."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


# --- DeepSpeed in checkpoints. Under ZeRO-1/2 every process holds the whole model in its working precision,
# a partition of the fp32 master weights and that partition's Adam moments (flat tensors); under ZeRO-3 the
# working weights are partitioned too (``ds_id`` parameters, gathered by ``distributed.whole_parameters``).


def zero_partitioned(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are managed by a DeepSpeed ZeRO optimizer (fp32 masters partitioned)."""
    return any(is_zero_managed(p) for p in model.parameters())


def is_zero_managed(param: torch.Tensor) -> bool:
    """A parameter whose fp32 master is held (partitioned) by a DeepSpeed ZeRO optimizer."""
    return hasattr(param, "_hp_mapping") or (hasattr(param, "_z3_optimizer") and param.requires_grad)


def full_master(param: torch.Tensor) -> torch.Tensor:
    """The whole fp32 master weight of a ZeRO-managed parameter (a collective), else the parameter itself."""
    if not is_zero_managed(param):
        return param
    if hasattr(param, "_z3_optimizer"):  # ZeRO-3
        return param._z3_optimizer.get_full_hp_param(param).view(param.ds_shape)
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def _stage3(zero) -> bool:
    return hasattr(zero, "fp32_partitioned_groups_flat")


def zero_optimizer_state(optimizer) -> dict:
    """This process's share of a ZeRO optimizer (``optimizer``: accelerate's wrapper): the inner AdamW's state
    over its flat partitions and the fp32 master partitions. Only the same number of processes under the
    same stage can resume from it (checked by ``check_zero_checkpoint``)."""
    zero = optimizer.optimizer
    if _stage3(zero):  # its inner AdamW holds no parameters between steps: DeepSpeed's own view of it
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

        state = zero._rigid_state_dict()
        base, partitions = state[OPTIMIZER_STATE_DICT], state[FP32_FLAT_GROUPS]
    else:
        base, partitions = zero.optimizer.state_dict(), zero.single_partition_of_fp32_groups
    return {"base": base, "fp32_partitions": [t.detach().cpu().clone() for t in partitions]}


def load_zero_optimizer_state(optimizer, state: dict) -> None:
    """The inverse of ``zero_optimizer_state``; the working weights are refreshed from the fp32 masters."""
    zero = optimizer.optimizer
    mine = zero.fp32_partitioned_groups_flat if _stage3(zero) else zero.single_partition_of_fp32_groups
    partitions = state["fp32_partitions"]
    if len(partitions) != len(mine) or any(a.shape != b.shape for a, b in zip(partitions, mine, strict=False)):
        raise ValueError("the fp32 master partitions do not match this run's (another model, LoRA setting or "
                         "process count?)")
    if _stage3(zero):
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT

        zero._rigid_load_state_dict({LOSS_SCALER: zero.loss_scaler, "dynamic_loss_scale": zero.dynamic_loss_scale,
                                     "overflow": False, OPTIMIZER_STATE_DICT: state["base"],
                                     FP32_FLAT_GROUPS: partitions})
        return
    zero.optimizer.load_state_dict(state["base"])
    with torch.no_grad():
        for current, saved in zip(mine, partitions, strict=True):
            current.copy_(saved)
    zero._hp_optimizer_states_linked = False  # DeepSpeed relinks the loaded moments at its next step


def zero_record(accelerator) -> dict | None:
    """What a ZeRO checkpoint needs on resume: its stage and process count (trainer_state.json)."""
    if not is_deepspeed(accelerator):
        return None
    return {"zero_stage": zero_stage(accelerator), "processes": accelerator.num_processes}


def check_zero_checkpoint(path, saved: dict | None, current: dict | None) -> None:
    if saved == current:
        return
    if saved is None:
        raise ValueError(f"checkpoint {path} was written without DeepSpeed; this run is DeepSpeed ZeRO-"
                         f"{current['zero_stage']}: resume it without DeepSpeed, or start over")
    if current is None:
        raise ValueError(f"checkpoint {path} was written under DeepSpeed ZeRO-{saved['zero_stage']} on "
                         f"{saved['processes']} processes, whose optimizer state is split per process: resume it "
                         "with the same launch")
    raise ValueError(f"checkpoint {path} was written under DeepSpeed ZeRO-{saved['zero_stage']} on "
                     f"{saved['processes']} processes; this run is ZeRO-{current['zero_stage']} on "
                     f"{current['processes']}: resume with the same launch")
