"""Multi-process pieces without a model: how a global micro-batch is dealt to processes, KTO's mismatched rows
drawn from the global micro-batch, the gather that lets a batch-level objective see the whole micro-batch
(losses and gradients against one process, in a real 2-process gloo group), the checkpoint protocol between
processes, and the main-process-only metrics writer."""

from __future__ import annotations

import json
import os
import tempfile
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from preftune.data import Collator
from preftune.data.tokenized import TokenizedExample
from preftune.objectives import GroupLogps, PairedLogps
from preftune.objectives.compute import compute
from preftune.objectives.table import get_objective, make_params
from preftune.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from preftune.training.distributed import Ranks, RowGather
from preftune.training.metrics import MetricsWriter, read_metrics
from preftune.training.schedule import Shard, shards


def test_a_global_micro_batch_is_dealt_rows_rank_to_rank_and_short_ones_get_a_stand_in():
    """Rows r::N; a micro-batch of 1 leaves process 1 a stand-in (the first example, not counted)."""
    assert Shard.of([7, 3, 9, 4, 1], 0, 2) == [7, 9, 1] and Shard.of([7, 3, 9, 4, 1], 1, 2) == [3, 4]
    lone = Shard.of([5], 1, 2)
    assert lone == [5] and lone.stand_in and lone.group == [5]
    assert not Shard.of([5], 0, 2).stand_in
    assert [list(s) for s in shards([[0, 1, 2], [3]], 1, 2)] == [[1], [3]]


def _example(index: int, prompt: list[int], completion: list[int], label: bool) -> TokenizedExample:
    return TokenizedExample(index=index, prompt_ids=prompt, completions=[completion], label=label)


def test_kto_mismatched_rows_come_from_the_global_micro_batch():
    """Process 1 holds examples 1 and 3 of [0, 1, 2, 3]: example 1 borrows example 2's completion and example 3
    example 0's (as one process collating all four would), cut to the longest real row of all four (6 tokens):
    example 3's prompt has 2 tokens, so example 0's 5-token completion is cut to 4."""
    group = [_example(0, [1], [10, 11, 12, 13, 14], True), _example(1, [1, 2], [20, 21], False),
             _example(2, [1, 2, 3], [30, 31, 32], True), _example(3, [4, 5], [40], False)]
    collator = Collator(pad_token_id=0, shape="unpaired")
    whole, mine = collator(group), collator(group[1::2], context=group)
    kl_whole = whole["input_ids"][4:][[1, 3]]  # slot-1 rows of examples 1 and 3
    kl_mine = mine["input_ids"][2:]
    width = kl_mine.shape[1]
    assert torch.equal(kl_mine, kl_whole[:, :width]) and not kl_whole[:, width:].any()
    assert kl_mine[1, :6].tolist() == [4, 5, 10, 11, 12, 13]
    assert collator(group[1::2])["input_ids"][2:][0, :4].tolist() == [1, 2, 40, 0]  # without context: local


class _GroupAccelerator:
    """The three things RowGather asks of an accelerator, on a plain gloo group."""

    device = torch.device("cpu")

    def __init__(self):
        self.process_index, self.num_processes = dist.get_rank(), dist.get_world_size()

    def gather(self, tensor):
        parts = [torch.empty_like(tensor) for _ in range(self.num_processes)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)


def _paired(theta: torch.Tensor, rows: torch.Tensor, state: dict) -> PairedLogps:
    """Policy log-probs that depend on a shared parameter θ (3,): chosen = x·θ, rejected = x·θ² − 1."""
    return PairedLogps(policy_chosen_logps=rows[:, :3] @ theta, chosen_tokens=rows[:, 3].long(),
                       policy_rejected_logps=rows[:, :3] @ theta ** 2 - 1, rejected_tokens=rows[:, 4].long(),
                       reference_chosen_logps=rows[:, 5], reference_rejected_logps=rows[:, 6], state=state)


def _unpaired(theta: torch.Tensor, rows: torch.Tensor, state: dict) -> GroupLogps:
    return GroupLogps(policy_logps=(rows[:, :3] @ theta)[:, None], tokens=rows[:, 3:4].long(),
                      mask=torch.ones(len(rows), 1, dtype=torch.bool), reference_logps=rows[:, 5:6],
                      labels=rows[:, 4] > 2, policy_kl_logps=rows[:, :3] @ theta ** 2, reference_kl_logps=rows[:, 6],
                      state=state)


CASES = {"beta_dpo": (_paired, {"rho": 0.6}), "aot": (_paired, {}), "bco": (_paired, {}),
         "aot_unpaired": (_paired, {}), "kto": (_unpaired, {})}


def _compare_with_one_process(rank: int, init_file: str, results: str) -> None:
    """In each of 2 processes: for every batch-level objective and global batch sizes 5 (rows 3 + 2) and 1
    (process 1 a stand-in), the gathered objective's local losses and the DDP-averaged gradient of θ against
    one process computing the objective on the whole batch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    gather, report = RowGather(_GroupAccelerator()), {}
    for name, (inputs, params) in CASES.items():
        objective = get_objective(name)
        for size in (5, 1):
            torch.manual_seed(size)
            data = torch.cat([torch.randn(size, 3), torch.randint(1, 5, (size, 2)).float(),
                              torch.randn(size, 2) * 3], dim=1)
            state = {"margin_mean": torch.tensor(0.3)} if name == "beta_dpo" else {}
            theta = torch.tensor([0.5, -0.2, 0.1], requires_grad=True)
            whole = compute(objective, inputs(theta, data, state), make_params(name, params))
            whole.losses.sum().div(size).backward()
            expected_grad, theta.grad = theta.grad.clone(), None
            mine = data[rank::2] if rank < size else data[:1]  # a stand-in holds the first example
            global_logps = gather(inputs(theta, mine, state), len(data[rank::2]))
            out = gather.local(compute(objective, global_logps, make_params(name, params)))
            (out.losses.sum() * 2 / size).backward()  # the loop's weight: processes / examples
            dist.all_reduce(theta.grad)
            theta.grad /= 2  # DDP averages gradients over processes
            report[f"{name}/{size}"] = {
                "losses": torch.allclose(out.losses, whole.losses[rank::2], atol=1e-6),
                "grad": torch.allclose(theta.grad, expected_grad, atol=1e-6),
                "state": all(torch.allclose(v, whole.state[k]) for k, v in out.state.items()),
            }
    with open(f"{results}.{rank}", "w") as handle:
        json.dump(report, handle)
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_batch_level_objectives_see_the_global_micro_batch_with_the_right_gradients(tmp_path):
    """β-DPO, AOT (both), BCO and KTO on 2 processes: each process's losses are its rows of the one-process
    losses (AOT: its quantiles), the running state is the one-process state, and the gradient of a shared
    parameter after DDP's averaging equals one process's gradient of the mean loss."""
    init_file = os.path.join(tempfile.mkdtemp(dir=tmp_path), "store")
    results = str(tmp_path / "report")
    # fork: the children start with this process's imports (spawning would import torch and preftune again)
    mp.start_processes(_compare_with_one_process, args=(init_file, results), nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        with open(f"{results}.{rank}") as handle:
            report = json.load(handle)
        assert len(report) == 2 * len(CASES)
        failed = {case: checks for case, checks in report.items() if not all(checks.values())}
        assert not failed, (rank, failed)


def test_checkpoint_is_published_only_when_every_process_has_written(tmp_path):
    """Two 'processes' (threads with a barrier): the checkpoint holds each one's RNG file; when process 1 dies
    before writing, the main one never publishes it and the previous checkpoint stays the latest."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def both(step, rank_1_dies=False):
        barrier, errors = threading.Barrier(2, timeout=2), []

        def process(rank):
            try:
                if rank == 1 and rank_1_dies:
                    barrier.wait()  # gets as far as the folder's creation, then dies
                    return
                save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, None, ranks=Ranks(rank, 2, barrier.wait))
            except threading.BrokenBarrierError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    assert both(1) == []
    first = latest_checkpoint(tmp_path)
    assert first.name == "step-00000001" and {"rng.json", "rng-rank1.json"} <= {p.name for p in first.iterdir()}
    assert both(2, rank_1_dies=True)  # the main process's barrier breaks: it publishes nothing
    assert latest_checkpoint(tmp_path) == first
    assert load_checkpoint(first, model, optimizer, scheduler, rank=1)["step"] == 1
    assert load_checkpoint(first, model, optimizer, scheduler, rank=3)["step"] == 1  # more processes: rank 0's RNG


def test_only_the_main_process_writes_metrics_and_a_half_row_is_dropped_on_resume(tmp_path):
    from preftune.config import LoopConfig

    class Process:  # what MetricsWriter asks of an accelerator, for the main process or another one
        log_with, trackers = [], []

        def __init__(self, main: bool):
            self.is_main_process = main

        def log(self, values, step):
            pass

    config = LoopConfig(tensorboard=False)
    other = MetricsWriter(tmp_path, None, Process(False), config)
    other.write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    MetricsWriter(tmp_path, None, Process(False), config)  # not main: leaves the file alone
    main = MetricsWriter(tmp_path, 2, Process(True), config)  # resuming at step 2: the killed row goes
    main.write({"step": 3, "loss": 0.3})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def _launched(kind: str, fsdp_version: int | None = None):
    """A stand-in for an accelerator as a launch brought it up: its distributed type and FSDP plugin."""
    from accelerate.utils import DistributedType

    plugin = type("Plugin", (), {"fsdp_version": fsdp_version})() if fsdp_version else None
    return type("Launched", (), {"distributed_type": DistributedType[kind],
                                 "state": type("State", (), {"fsdp_plugin": plugin})()})()


def test_sharding_engines_are_accepted_only_where_the_task_handles_them(monkeypatch):
    """Before anything is prepared: FSDP2 and DeepSpeed are accepted by a task that handles them (preference
    training), refused by others (the reward trainer, the on-policy loop) naming what to use, FSDP1 refused;
    plain processes pass."""
    from preftune.training.distributed import refuse_unsupported_engines

    for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(variable, "false")
    for engine, version in (("DEEPSPEED", None), ("FSDP", 2)):
        with pytest.raises(ValueError, match=f"{engine.lower()} set-up, which this command does not.*ddp.yaml"):
            refuse_unsupported_engines(_launched(engine, version), fsdp_ok=False, deepspeed_ok=False)
    with pytest.raises(ValueError, match="did not come up as FSDP2.*fsdp_version: 2"):
        refuse_unsupported_engines(_launched("FSDP", 1), fsdp_ok=True)
    refuse_unsupported_engines(_launched("FSDP", 2), fsdp_ok=True)
    refuse_unsupported_engines(_launched("DEEPSPEED"), fsdp_ok=False, deepspeed_ok=True)
    refuse_unsupported_engines(_launched("MULTI_CPU"), fsdp_ok=False)


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_a_sharding_set_up_that_came_up_as_plain_processes_is_refused(engine, monkeypatch):
    """``accelerate launch`` with an FSDP or DeepSpeed set-up exports ACCELERATE_USE_<ENGINE>=true; if the
    processes still came up plain (MULTI_CPU: accelerate 1.15 offers both to GPU-class devices only, preftune
    turns them on for CPU processes, but FSDP1 or a missing deepspeed package is left plain), each would hold
    the whole model and optimizer state although the set-up promised shards: refused, saying why."""
    from preftune.training.distributed import refuse_unsupported_engines

    plain = _launched("MULTI_CPU")
    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "false")
    refuse_unsupported_engines(plain, fsdp_ok=True, deepspeed_ok=True)
    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    expected = "did not come up as FSDP2" if engine == "FSDP" else "came up without DeepSpeed.*pip install deepspeed"
    with pytest.raises(ValueError, match=expected):
        refuse_unsupported_engines(plain, fsdp_ok=True, deepspeed_ok=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_gets_the_runs_batch_and_clipping(stage):
    """DeepSpeed sees one micro-batch of training.batch_size per process, no accumulation of its own (preftune
    marks the boundary) and training.max_grad_norm as its clipping, under ZeRO-2 and ZeRO-3 alike."""
    from preftune.training.engines import configure_deepspeed

    plugin = type("Plugin", (), {"zero_stage": stage, "deepspeed_config": {}})()
    launched = type("Launched", (), {"num_processes": 2, "state": type("State", (), {"deepspeed_plugin": plugin})()})()
    configure_deepspeed(launched, batch_size=2, max_grad_norm=0.5)
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                       "train_batch_size": 4, "gradient_clipping": 0.5}
