"""Judges: one small interface over every way of telling which completion is better.

A judge answers ``compare(prompts, firsts, seconds)``: for each item, the probability that ``firsts[i]``
is the better answer to ``prompts[i]`` than ``seconds[i]``, or None when the judge could not tell (an
unparsable reply, a request that failed after every retry). A *pointwise* judge also answers
``score(prompts, completions)``: a number per completion (higher is better) or None. Its ``compare``
comes from the score difference: 1.0 when the first scores higher, 0.0 when lower, 0.5 for a tie.

Judges never drop a result silently: every None is counted in ``judge.summary()`` (``unparsable``: a
result that could not be read as a score or verdict; ``failed``: no result at all), which callers print.

The ``judge:`` config section picks the kind with ``type:``; every other key belongs to that kind's
``Config`` dataclass and is checked before any model loads or any request is sent. A judge kind is a class
with a ``Config`` attribute (a dataclass) and an ``__init__(self, config)``; the table below names where
each lives and is imported only when used.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ...config import ConfigError, build_section

Prompt = str | list[dict[str, str]]  # text, or a list of {role, content} messages

# type -> "module:Class", imported only when that kind of judge is used (a chat or reward model pulls in torch)
JUDGES: dict[str, str] = {
    "function": "preftune.feedback.judges.function:FunctionJudge",
    "reward_model": "preftune.feedback.judges.reward_model:RewardModelJudge",
    "sequence_classifier": "preftune.feedback.judges.sequence_classifier:SequenceClassifierJudge",
    "chat_model": "preftune.feedback.judges.chat_model:ChatModelJudge",
    "http": "preftune.feedback.judges.http:HttpJudge",
    "constitution": "preftune.feedback.judges.constitution:ConstitutionJudge",
}


class JudgeError(RuntimeError):
    """A judge cannot work at all (a rejected API key, a missing model): stop, do not count and go on."""


class NoUsableJudgements(JudgeError):
    """Every judgement came back unusable: there is nothing to write, and exit code 0 would hide it."""


class Judge(ABC):
    """Pairwise interface; see the module docstring for what the numbers mean."""

    pointwise = False

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._examples: dict[str, str] = {}  # the first item of each kind of failure, to show the user
        self._lock = threading.Lock()  # the HTTP judge counts from worker threads

    @abstractmethod
    def compare(self, prompts: Sequence[Prompt], firsts: Sequence[str], seconds: Sequence[str]) -> list[float | None]:
        """P(first is better) per item, in [0, 1], or None."""

    def count(self, key: str, n: int = 1, example: str | None = None) -> None:
        """Add ``n`` to counter ``key``; ``example`` (what was not usable) is kept for the first one."""
        with self._lock:
            self._counts[key] += n
            if example is not None:
                self._examples.setdefault(key, example[:200])

    def examples(self) -> dict[str, str]:
        """The first unusable item of each kind (``unparsable``: the reply or value; ``failed``: the error)."""
        with self._lock:
            return dict(self._examples)

    def check_usable(self, what: str, counts: dict[str, int] | None = None) -> None:
        """Raise ``NoUsableJudgements`` when every item the judge was asked about got no result (``counts``: the
        summary to judge by, e.g. summed over processes; this judge's own by default)."""
        counts = self.summary() if counts is None else counts
        if counts.get("judged") and counts.get("no_result") == counts["judged"]:
            why = ", ".join(f"{counts[k]} {k}" for k in ("unparsable", "failed", "too_large") if counts.get(k))
            shown = "; ".join(f"first {k}: {v!r}" for k, v in self.examples().items())
            raise NoUsableJudgements(f"the judge gave no usable result for any of the {counts['judged']} items, "
                                     f"so {what} ({why or 'no result'}{'; ' + shown if shown else ''})")

    def tally(self, results: list[float | None]) -> list[float | None]:
        """Count the items answered (``judged``) and those without a result (``no_result``)."""
        self.count("judged", len(results))
        self.count("no_result", sum(r is None for r in results))
        return results

    def summary(self) -> dict[str, int]:
        """Counters: ``judged`` (completions scored or pairs compared), ``no_result`` (of those, how many
        got None), ``unparsable`` and ``failed`` (why), and kind-specific ones such as ``retries``."""
        with self._lock:
            return dict(sorted(self._counts.items()))

    def close(self) -> None:
        """Release files, connections and threads; the judge is not used afterwards."""
        return None  # nothing held by default: a subclass that holds a resource overrides this

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PointwiseJudge(Judge):
    """A judge that scores each completion on its own; ``compare`` follows from the scores."""

    pointwise = True

    @abstractmethod
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float | None]:
        """A score per completion (higher is better), or None."""

    def compare(self, prompts: Sequence[Prompt], firsts: Sequence[str], seconds: Sequence[str]) -> list[float | None]:
        check_lengths(prompts, firsts, seconds)
        scores = self.score([*prompts, *prompts], [*firsts, *seconds])
        n = len(firsts)
        return [preference_from_scores(a, b) for a, b in zip(scores[:n], scores[n:], strict=True)]


def score_groups(judge: PointwiseJudge, prompts: Sequence[Prompt], groups: Sequence[Sequence[str]]
                 ) -> list[list[float | None]]:
    """A pointwise judge's score of every text of every group (one group of completions per prompt), in one
    call, given back per group."""
    flat = judge.score([p for p, g in zip(prompts, groups, strict=True) for _ in g], [t for g in groups for t in g])
    out, start = [], 0
    for group in groups:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


def compare_within_groups(judge: Judge, prompts: Sequence[Prompt], asks: list[tuple[int, int, int]],
                          groups: Sequence[Sequence[str]]) -> list[float | None]:
    """P(text i beats text j) for each ``(k, i, j)`` of ``asks`` (texts i and j of group k), in one call."""
    if not asks:
        return []
    return judge.compare([prompts[k] for k, _, _ in asks], [groups[k][i] for k, i, _ in asks],
                         [groups[k][j] for k, _, j in asks])


def preference_from_scores(first: float | None, second: float | None) -> float | None:
    """1.0 / 0.5 / 0.0 as the first score is above / equal to / below the second; None if either is."""
    if first is None or second is None:
        return None
    return 1.0 if first > second else 0.0 if first < second else 0.5


def check_lengths(prompts: Sequence, *others: Sequence) -> None:
    lengths = {len(prompts), *(len(o) for o in others)}
    if len(lengths) != 1:
        raise ValueError(f"a judge needs one prompt per completion; got lists of lengths {sorted(lengths)}")


def render_prompt(prompt: Prompt) -> str:
    """A prompt as plain text for a judge's instruction: a single user turn is its content, a longer
    conversation is written out one ``Role: content`` paragraph per message."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def judge_class(kind: str) -> type:
    """The class of judge kind ``kind`` (imported now; a missing optional module is a ConfigError)."""
    module_name, _, class_name = JUDGES[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # the judge's module exists but one of its dependencies does not
            raise
        raise ConfigError(
            f"config key 'judge.type': judge type {kind!r} is not available in this installation "
            f"({module_name.replace('.', '/')}.py is missing); available: "
            + ", ".join(k for k in JUDGES if importlib.util.find_spec(JUDGES[k].partition(":")[0]))
        ) from exc
    return getattr(module, class_name)


def judge_config(values: dict[str, Any], prefix: str = "judge.") -> tuple[type, Any]:
    """(judge class, its checked config) for a ``judge:`` section, without building the judge (which may
    load a model): unknown keys and bad values raise ``ConfigError`` naming the dotted key."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}': expected a mapping with a 'type', got {values!r}")
    values = dict(values)
    kind = values.pop("type", None)
    if kind not in JUDGES:
        close = difflib.get_close_matches(str(kind), list(JUDGES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config key '{prefix}type': expected one of {', '.join(JUDGES)}, got {kind!r}{hint}")
    cls = judge_class(kind)
    return cls, build_section(cls.Config, values, prefix)


def build_judge(values: dict[str, Any], prefix: str = "judge.") -> Judge:
    """The judge a ``judge:`` config section describes (see ``judge_config``)."""
    cls, config = judge_config(values, prefix)
    return cls(config)


__all__ = [
    "JUDGES",
    "Judge",
    "JudgeError",
    "NoUsableJudgements",
    "PointwiseJudge",
    "Prompt",
    "build_judge",
    "check_lengths",
    "compare_within_groups",
    "score_groups",
    "judge_class",
    "judge_config",
    "preference_from_scores",
    "render_prompt",
]
