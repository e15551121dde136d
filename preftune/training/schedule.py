"""Which examples each micro-batch holds: a pure function of (seed, micro-batch number).

Because the order is recomputed rather than iterated, the data position of a run is just its optimizer
step, and a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math

import torch


class BatchSchedule:
    """Epoch ``e`` visits the examples in ``randperm(n)`` seeded by ``(seed, e)``, ``global_batch`` at a time.

    ``global_batch`` is the per-device batch size times the number of processes; each process takes the
    rows ``rank::world`` of every global micro-batch.
    """

    def __init__(self, size: int, global_batch: int, accumulation: int, seed: int, rank: int = 0, world: int = 1):
        if size < 1:
            raise ValueError("no training examples left after validation and truncation")
        self.size, self.global_batch, self.accumulation = size, global_batch, accumulation
        self.seed, self.rank, self.world = seed, rank, world
        self.batches_per_epoch = math.ceil(size / global_batch)
        self._epoch, self._order = -1, None

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps:
            return max_steps
        return max(1, math.ceil(epochs * self.batches_per_epoch / self.accumulation))

    def epoch_of(self, step: int) -> float:
        return step * self.accumulation / self.batches_per_epoch

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._order

    def micro_batch(self, number: int) -> list[int]:
        """Global positions of micro-batch ``number`` (all processes together)."""
        epoch, slot = divmod(number, self.batches_per_epoch)
        order = self._permutation(epoch)
        return order[slot * self.global_batch : (slot + 1) * self.global_batch]

    def step(self, step: int) -> list[list[int]]:
        """The micro-batches of optimizer step ``step`` (0-based), each the global positions."""
        first = step * self.accumulation
        return [self.micro_batch(k) for k in range(first, first + self.accumulation)]

    def shard(self, positions: list[int]) -> Shard:
        return Shard.of(positions, self.rank, self.world)


class Shard(list):
    """This process's positions of a global micro-batch: rows ``rank::world``. ``group`` is the whole global
    micro-batch (what one process would hold): KTO's mismatched pairs are drawn from it.

    A micro-batch smaller than the number of processes leaves some with no example; such a process runs a
    *stand-in* (the group's first example, ``stand_in`` True) whose loss is weighted 0 and whose statistics
    are not counted, because every process must run the same forwards and backwards for the collectives in
    them (DDP's gradient all-reduce and buffer broadcast, FSDP's all-gathers) to meet.
    """

    group: list[int]
    stand_in: bool

    @classmethod
    def of(cls, group: list[int], rank: int, world: int) -> Shard:
        mine = group[rank::world]
        shard = cls(mine or group[:1])
        shard.group, shard.stand_in = list(group), not mine
        return shard


def shards(groups: list[list[int]], rank: int, world: int) -> list[Shard]:
    """Each process's share of every global batch (evaluation, reference precomputation)."""
    return [Shard.of(group, rank, world) for group in groups]


def sequential_batches(size: int, batch_size: int) -> list[list[int]]:
    """Evaluation and precomputation: every example once, in order."""
    return [list(range(start, min(start + batch_size, size))) for start in range(0, size, batch_size)]
