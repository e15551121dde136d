"""Several processes (``accelerate launch`` or ``torchrun``): who writes, what is summed across processes, and
how an objective that compares the examples of a batch sees the whole global micro-batch.

The global batch is the unit. Process ``r`` of ``N`` holds rows ``r::N`` of every global micro-batch
(``schedule.Shard``); gradients are averaged by DDP, so each example weighs
1 / (examples in the step) exactly as in one process. Logged numbers are sums and counts added over every
process before dividing (``reduce_across``), never a mean of per-process means. Objectives stay pure
functions: for one whose trait ``batch_level`` is set, ``RowGather`` all-gathers its input tensors (with
gradient) into the global micro-batch in one-process order, the objective runs on that, and each process
keeps its own rows' losses, so the summed gradient is that of one process on the whole micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..objectives import GroupLogps, ObjectiveOutput, PairedLogps
from .metrics import MeanAccumulator

# Padding for a rank's missing rows/columns where 0 would mean something: token counts are 1 and scores NaN
# where a slot is empty (as the collator and ``step._grid`` fill them).
PAD_VALUES = {"tokens": 1.0, "scores": float("nan")}


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes, and the barrier that makes the others wait."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = _no_barrier

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, accelerator) -> Ranks:
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)


ONE_PROCESS = Ranks()


def is_main_process() -> bool:
    """Rank 0 of the launched job (or the only process). Starts the process group when launched, which
    the accelerator would do anyway; callable before the accelerator exists."""
    from accelerate import PartialState

    from ..modeling import launched_on_cpu

    return PartialState(cpu=launched_on_cpu()).is_main_process


def main_decides(accelerator, value):
    """``value`` as the main process has it, on every process (a file that one process sees and another
    does not would otherwise send them down different paths and deadlock a collective)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def any_process(accelerator, *flags: bool) -> list[bool]:
    """Each flag true on at least one process (e.g. a stop request or a non-finite loss seen by one)."""
    if accelerator.num_processes == 1:
        return list(flags)
    values = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(values, reduction="sum")]


def reduce_across(acc: MeanAccumulator, accelerator) -> MeanAccumulator:
    """The sums and counts of every process added together (a process may lack a name: e.g. no desirable
    example of KTO in its rows), so that ``means()`` is the mean over every example of the global batch."""
    if accelerator.num_processes == 1:
        return acc
    from accelerate.utils import gather_object

    names = list(dict.fromkeys(gather_object(list(acc.sums))))  # the order the main process logs them in
    local = [acc.sums.get(n, 0.0) for n in names] + [acc.counts.get(n, 0.0) for n in names]
    total = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    out = MeanAccumulator()
    for i, name in enumerate(names):
        out.add(name, total[i], total[len(names) + i])
    return out


def _all_gather_with_grad(tensor: Tensor) -> Tensor:
    """``(world * R, C)`` from every process's ``(R, C)``; the backward sums each process's gradient for a
    block and returns it to the process that owns the block."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as functional

    gather = getattr(functional, "all_gather_single_autograd", None)
    if gather is None:  # torch < 2.13 names it differently
        gather = functional.all_gather_tensor_autograd
    return gather(tensor.contiguous(), 0, dist.group.WORLD)  # waits for the collective on first use


class RowGather:
    """The objective inputs of a global micro-batch, gathered from every process, in one-process order."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    def __call__(self, logps: PairedLogps | GroupLogps, rows: int) -> PairedLogps | GroupLogps:
        """``logps``: this process's ``rows`` examples (a stand-in holds one that is not counted: ``rows`` 0).
        Global example ``j`` is local row ``j // N`` of process ``j % N``, as ``Shard`` deals them."""
        names = [f.name for f in dataclasses.fields(logps) if f.name != "state" and getattr(logps, f.name) is not None]
        local = {n: _as_columns(getattr(logps, n)[:rows]) for n in names}
        widths = torch.tensor([[rows] + [t.shape[1] for t in local.values()]], device=self.accelerator.device)
        every = self.accelerator.gather(widths).reshape(self.world, len(names) + 1)  # pad to the largest
        most_rows, most_cols = int(every[:, 0].max()), every[:, 1:].max(dim=0).values.tolist()
        blocks = []
        for name, cols in zip(names, most_cols, strict=True):
            flat = local[name].to(torch.float64)
            pad = (0, cols - flat.shape[1], 0, most_rows - rows)
            blocks.append(torch.nn.functional.pad(flat, pad, value=PAD_VALUES.get(name, 0.0)))
        gathered = _all_gather_with_grad(torch.cat(blocks, dim=1))
        group_size = int(every[:, 0].sum())
        order = torch.tensor([(j % self.world) * most_rows + j // self.world for j in range(group_size)],
                             device=gathered.device)
        ordered = gathered.index_select(0, order)
        fields, start = {}, 0
        for name, cols in zip(names, most_cols, strict=True):
            part = ordered[:, start : start + cols]
            start += cols
            fields[name] = _restore(part, getattr(logps, name))
        return dataclasses.replace(logps, **fields)

    def local(self, out: ObjectiveOutput) -> ObjectiveOutput:
        """This process's share of the global output: its own rows (for AOT, whose losses are by quantile,
        every N-th quantile: any split that counts each once sums to the whole). Batch statistics in
        ``metrics`` and ``state`` are global already."""
        take = slice(self.rank, None, self.world)
        return dataclasses.replace(out, losses=out.losses[take], chosen_rewards=out.chosen_rewards[take],
                                   rejected_rewards=out.rejected_rewards[take])


def _as_columns(tensor: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1)``; ``(B, K)`` / ``(B, T)`` as they are."""
    return tensor[:, None] if tensor.dim() == 1 else tensor


def _restore(part: Tensor, like: Tensor) -> Tensor:
    """Back to ``like``'s rank and dtype (float64 carried bools and counts exactly)."""
    if like.dim() == 1:
        part = part[:, 0]
    if like.dtype == torch.bool:
        return part != 0
    if not like.is_floating_point():
        return part.round().to(like.dtype)
    return part.to(like.dtype)


def collate_shard(examples: list, shard: list[int], collator, device: torch.device) -> dict[str, Tensor]:
    """The batch of this process's rows of a global batch (``schedule.Shard``; a plain list is a whole
    batch). KTO's mismatched rows come from the whole group; a stand-in is marked ``stand_in``."""
    group = getattr(shard, "group", shard)
    batch = collator([examples[i] for i in shard], context=[examples[i] for i in group])
    batch = {k: v.to(device) for k, v in batch.items()}
    if getattr(shard, "stand_in", False):
        batch["stand_in"] = torch.tensor(True, device=device)
    return batch


def sharding_engine(accelerator) -> str | None:
    """"fsdp" or "deepspeed" when the launch asked for one (weights split across processes), else None.

    Asked for, not only granted: ``accelerate launch`` with an FSDP set-up exports ``ACCELERATE_USE_FSDP=true``;
    on a CPU accelerate 1.15 grants FSDP to GPU-class devices only, and ``modeling.make_accelerator`` turns it
    on itself (FSDP2 over gloo). A launch that still came up unsharded is not what its set-up file promised."""
    from accelerate.utils import DistributedType

    granted = {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(accelerator.distributed_type)
    if granted is not None:
        return granted
    from .engines import asked

    return next((engine for engine in ("fsdp", "deepspeed") if asked(engine)), None)


def refuse_unsupported_engines(accelerator, fsdp_ok: bool, deepspeed_ok: bool = False) -> None:
    """DDP always; FSDP2 and DeepSpeed where the task's checkpoint, reference and export paths handle
    them (``fsdp_ok``, ``deepspeed_ok``). Stops before anything is prepared rather than failing hours later at
    the first save."""
    from accelerate.utils import DistributedType

    engine = sharding_engine(accelerator)
    if engine is None:
        return
    if engine == "fsdp" and fsdp_ok:
        if not is_fsdp2(accelerator):
            raise ValueError("launched with accelerate's fsdp set-up, but it did not come up as FSDP2 (fsdp_version: "
                             "2 in the accelerate config, as configs/accelerate/fsdp.yaml has it); preftune trains "
                             "under FSDP2 only")
        return
    if engine == "deepspeed" and deepspeed_ok:
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            raise ValueError("launched with accelerate's deepspeed set-up, but the processes came up without "
                             "DeepSpeed (is it installed? pip install deepspeed)")
        return
    raise ValueError(f"launched with accelerate's {engine} set-up, which this command does not train under "
                     "(checkpoints, final/ and the reference would hold shards); launch with "
                     "configs/accelerate/ddp.yaml, with LoRA if the model is too large for one device, or use "
                     "preftune train / sft, which run under fsdp.yaml and deepspeed_zero2/3.yaml")


def is_fsdp2(accelerator) -> bool:
    """The weights are FSDP2 shards (DTensors): every process holds a slice of each."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return accelerator.distributed_type == DistributedType.FSDP and getattr(plugin, "fsdp_version", 1) == 2


# --- Whole tensors from shards and back: FSDP2 (DTensor parameters) and DeepSpeed ZeRO-3 (``ds_id`` parameters,
# whose own data is empty outside a forward). Every process calls these in the same order (a gather is a
# collective); under DDP, ZeRO-1/2 or one process they return their input.


def is_zero3(tensor: Tensor) -> bool:
    return hasattr(tensor, "ds_id")


@torch.no_grad()
def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard or a ZeRO-3 parameter (collective), or ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    if is_zero3(tensor):
        with whole_parameters([tensor]):
            return tensor.data.clone()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def whole_parameters(params, modify: bool = False):
    """Inside, ZeRO-3 ``params`` hold their whole data (gathered: a collective); with ``modify`` what every
    process wrote into them alike is partitioned back on exit. FSDP2 shards and plain tensors are left as they
    are: a change made shard by shard is already in place."""
    params = [p for p in params if is_zero3(p)]
    if not params:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` cut the way ``like`` is sharded: this process's slice, taken locally (every process read the
    same whole tensor, so nothing is sent), or ``whole`` itself when ``like`` is not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return whole
    whole = whole.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def resharded(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every FSDP2 unit back in its sharded state. A unit that keeps its gathered weights after
    a forward (the root, the final norm + LM head, any unit after a forward without backward) shows plain
    whole tensors as its parameters until then; anything that reads or writes parameters by name (checkpoints,
    TR-DPO) needs the shards. Local, no collective; a no-op without FSDP2."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            # A unit whose forward ran without its root's (the reference's backbone and head, called directly)
            # still counts itself as in forward, where a keep-gathered unit ignores reshard(). Called between
            # steps only, so idle is its true state.
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                group._training_state = TrainingState.IDLE
            unit.reshard()
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module``'s weights are split across processes (FSDP2 or ZeRO-3): its forwards are collective."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or is_zero3(p) for p in module.parameters())


def whole_state_dict(module: torch.nn.Module, masters: bool = False) -> dict[str, Tensor]:
    """``module.state_dict()`` with every shard gathered into its whole tensor, on CPU (collective under FSDP2
    and ZeRO-3; every process gets it). ``masters``: each DeepSpeed-managed parameter as its whole fp32 master,
    what ``final/`` holds when DeepSpeed trains in bf16 and keeps only a bf16 working copy in the model."""
    from .engines import full_master, is_zero_managed

    return {name: (full_master(t) if masters and is_zero_managed(t) else full_tensor(t)).detach().cpu()
            for name, t in module.state_dict(keep_vars=True).items()}


def start_fsdp(module: torch.nn.Module) -> None:
    """FSDP2 decides which unit is the root at the first forward it sees. preftune calls parts of the model
    directly (the backbone and the LM head of the log-prob path, the reference with adapters off, the
    sampler), so the root is settled here, before any of them runs."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module._get_fsdp_state()._lazy_init()


def shard_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model (the reference) sharded as accelerate shards the policy, so it is not held whole by
    every process; its forwards are then collective like the policy's."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    model = fsdp2_prepare_model(accelerator, model)
    start_fsdp(model)
    return model
