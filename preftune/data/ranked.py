"""Ranked lists -> preference pairs (``data.ranked_to_pairs``), for objectives that train on pairs.

Pairs are formed in best-first order (``RankedExample.order``: stable for ties). A pair whose two scores are
equal states no preference, so it is skipped and counted; a list that gives no pair at all is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .examples import PairExample, RankedExample

MODES = ("all_pairs", "best_vs_worst", "best_vs_each")
_SOURCES_SHOWN = 10


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass
class RankedPairsSummary:
    mode: str
    lists: int = 0
    pairs: int = 0
    tied: int = 0  # pairs skipped because their scores are equal
    without_pairs: list[str] = field(default_factory=list)  # sources of lists that gave no pair

    def describe(self) -> str:
        """One line for the log, e.g. "ranked lists -> pairs (data.ranked_to_pairs=all_pairs): 3 lists gave
        7 pairs, 2 pairs with tied scores skipped, 1 list gave no pair: train.jsonl:4"."""
        text = (f"ranked lists -> pairs (data.ranked_to_pairs={self.mode}): {_count(self.lists, 'list')} gave "
                f"{_count(self.pairs, 'pair')}")
        if self.tied:
            text += f", {_count(self.tied, 'pair')} with tied scores skipped"
        if self.without_pairs:
            names = ", ".join(self.without_pairs[:_SOURCES_SHOWN])
            if len(self.without_pairs) > _SOURCES_SHOWN:
                names += f" and {len(self.without_pairs) - _SOURCES_SHOWN} more"
            text += f", {_count(len(self.without_pairs), 'list')} gave no pair (all scores tied): {names}"
        return text


def pair_positions(scores: list[float], mode: str) -> tuple[list[tuple[int, int]], int]:
    """(chosen, rejected) positions into the list (file order) and the number of tied pairs skipped.

    ``all_pairs``: every i ranked above j; ``best_vs_worst``: the first against the last of the order;
    ``best_vs_each``: the first against every other. Scores [3, 1, 2] rank as 0, 2, 1: all_pairs gives
    (0, 2), (0, 1), (2, 1).
    """
    if mode not in MODES:
        raise ValueError(f"data.ranked_to_pairs must be one of {', '.join(MODES)}, got {mode!r}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if mode == "all_pairs":
        candidates = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
    elif mode == "best_vs_worst":
        candidates = [(order[0], order[-1])]
    else:
        candidates = [(order[0], other) for other in order[1:]]
    pairs = [(i, j) for i, j in candidates if scores[i] > scores[j]]
    return pairs, len(candidates) - len(pairs)


def ranked_to_pairs(examples: list[RankedExample], mode: str) -> tuple[list[PairExample], RankedPairsSummary]:
    """Pairs from every list, in list order; a pair's source names its list and items (1-based, as in errors)."""
    summary = RankedPairsSummary(mode, lists=len(examples))
    pairs: list[PairExample] = []
    for example in examples:
        positions, tied = pair_positions(example.scores, mode)
        summary.tied += tied
        if not positions:
            summary.without_pairs.append(example.source)
        for i, j in positions:
            source = f"{example.source} (completions {i + 1} > {j + 1})"
            pairs.append(PairExample(source, example.prompt, example.completions[i], example.completions[j]))
    summary.pairs = len(pairs)
    return pairs, summary
