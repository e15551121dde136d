"""Spreading the work of ``generate``, ``label`` and ``winrate`` over the processes of ``accelerate launch`` or
``torchrun`` (one process, the usual case, is the same code with one shard).

Work is cut into units first (batches of prompts, chunks for a judge), exactly as one process cuts it, and
unit k goes to process k mod N: each unit is computed as one process would compute it (same composition,
same seed), so N processes write the same file as one. Results come back to every process in unit order
(``accelerate.utils.gather_object``), and only the main process writes files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Processes:
    """This process's place among those launched together: ``rank`` of ``count``, its ``device``."""

    def __init__(self):
        from accelerate import PartialState

        from ..modeling import launched_on_cpu

        # under a launcher this joins the process group (gloo on CPUs, nccl on GPUs)
        state = PartialState(cpu=launched_on_cpu())
        self.rank, self.count = state.process_index, state.num_processes
        self.is_main, self.device = state.is_main_process, state.device
        self._state = state

    def gather(self, items: list) -> list:
        """Every process's ``items``, concatenated in rank order, on every process."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def map(self, units: Sequence[T], work: Callable[[T], R]) -> list[R]:
        """``[work(u) for u in units]``, unit k computed by process k mod N; the results, in unit order, on
        every process."""
        mine = [(k, work(units[k])) for k in range(self.rank, len(units), self.count)]
        results: list[Any] = [None] * len(units)
        for k, result in self.gather(mine):
            results[k] = result
        return results

    def rounds(self, units: Sequence[T]) -> Iterator[tuple[list[T], T | None]]:
        """Units N at a time: (the round's units, this process's one or None). A caller that gathers once per
        round can write each round's results before computing the next (resumable output)."""
        for first in range(0, len(units), self.count):
            round_units = list(units[first : first + self.count])
            yield round_units, round_units[self.rank] if self.rank < len(round_units) else None

    def sum_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Counters (a judge's summary) added up over the processes."""
        total: Counter = Counter()
        for part in self.gather([counts]):
            total.update(part)
        return dict(sorted(total.items()))

    def barrier(self) -> None:
        self._state.wait_for_everyone()
