"""Truncation that is explicit and reported: the prompt keeps its end, every completion keeps its start,
and an example that would lose a whole completion is dropped (named) rather than changed silently."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import DataConfig

_SOURCES_SHOWN = 10  # dropped examples named in the one-line summary
# What describe() counts, by data shape: a dropped ranked list is one list, not one completion.
UNITS = {"pairs": "pair", "ranked": "ranked list"}


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass
class TruncationSummary:
    examples: int  # examples given, dropped ones included
    prompts_truncated: int
    completions_truncated: int
    dropped: list[str]  # sources of dropped examples
    unit: str = "pair"  # "pair", "ranked list" or "example": the word describe() counts in
    max_prompt_length: int | None = None
    # every example that was cut: (source, prompt cut, completions cut); dropped ones are in ``dropped``
    cut: list[tuple[str, bool, int]] = field(default_factory=list)

    def report_rows(self) -> list[dict]:
        """One row per example truncation changed, for the run's ``truncated_rows.jsonl``."""
        rows = [{"source": s, "prompt_truncated": p, "completions_truncated": c, "dropped": False} for s, p, c in self.cut]
        return rows + [{"source": s, "dropped": True, "why": "a completion would be empty"} for s in self.dropped]

    def describe(self) -> str:
        """One line for the log, e.g. "tokenized 1000 pairs: 12 prompts truncated to 512 tokens (kept
        their end), 30 completions truncated (kept their start), 2 pairs dropped because ..."."""
        parts = []
        if self.prompts_truncated:
            rows = _named([s for s, prompt, _ in self.cut if prompt])
            parts.append(f"{count(self.prompts_truncated, 'prompt')} truncated to {self.max_prompt_length} tokens "
                         f"(kept their end: {rows})")
        if self.completions_truncated:
            rows = _named([s for s, _, completions in self.cut if completions])
            parts.append(f"{count(self.completions_truncated, 'completion')} truncated (kept their start: {rows})")
        if self.dropped:
            parts.append(f"{count(len(self.dropped), self.unit)} dropped because a completion would be empty: "
                         f"{_named(self.dropped)}")
        return f"tokenized {count(self.examples, self.unit)}: " + (", ".join(parts) or "nothing truncated")


def _named(sources: list[str]) -> str:
    names = ", ".join(sources[:_SOURCES_SHOWN])
    return names + (f" and {len(sources) - _SOURCES_SHOWN} more" if len(sources) > _SOURCES_SHOWN else "")


def truncate(prompt: list[int], completions: list[list[int]], has_bos: bool, data: DataConfig):
    """(prompt, completions, prompt was cut, number of completions cut), or None when any completion would
    be left with no token: the whole example goes then, since dropping one completion of a ranked list or
    of the samples would silently change the list. The prompt keeps its end (the question sits there),
    after its BOS."""
    prompt_cut = data.max_prompt_length is not None and len(prompt) > data.max_prompt_length
    if prompt_cut:
        bos = prompt[:1] if has_bos else []
        keep = data.max_prompt_length - len(bos)
        prompt = bos + prompt[len(prompt) - keep :]
    if data.max_length is None:
        return prompt, completions, prompt_cut, 0
    room = data.max_length - len(prompt)
    if room <= 0 or not all(completions):
        return None
    cut = sum(len(c) > room for c in completions)
    return prompt, [c[:room] for c in completions], prompt_cut, cut
