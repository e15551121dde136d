"""A Python function as a pointwise judge: ``judge: {type: function, function: "my_module:score"}``.

The function takes ``(completion)`` or ``(prompt, completion)`` (the prompt as given: text or messages),
plus any ``kwargs`` from the config, and returns a number (higher is better). None, NaN or something that
is not a number counts as unparsable. A sentiment lexicon is the classic case (the DPO paper's controlled
sentiment generation), e.g. with ``vaderSentiment`` installed, in ``my_judges.py``::

    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    _vader = SentimentIntensityAnalyzer()

    def positivity(completion: str) -> float:
        return _vader.polarity_scores(completion)["compound"]  # in [-1, 1]

``function`` is ``package.module:name`` (importable, or a module in the current directory) or
``path/to/file.py:name``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ... import user_code
from ...config import ConfigError
from . import PointwiseJudge, Prompt, check_lengths

log = logging.getLogger("preftune")


@dataclass
class FunctionJudgeConfig:
    function: str = ""  # "package.module:name" or "path/to/file.py:name"
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to every call


def load_function(spec: str) -> Callable:
    """``"module:name"`` -> the callable it names (errors name the config key)."""
    return user_code.load_function(spec, "judge.function")


def _positional_arity(function: Callable, given: dict) -> int:
    """1 for ``f(completion)``, 2 for ``f(prompt, completion)``: the number of required positional
    parameters left once the config's kwargs are bound (a function whose parameters all have defaults,
    or that takes ``*args``, gets the completion alone)."""
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return 1
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in given]
    required = sum(p.default is p.empty for p in positional)
    if required == 0 and (positional or any(p.kind is p.VAR_POSITIONAL for p in params)):
        return 1
    return required


class FunctionJudge(PointwiseJudge):
    Config = FunctionJudgeConfig

    def __init__(self, config: FunctionJudgeConfig):
        super().__init__()
        self.config = config
        self.function = load_function(config.function)
        self.arity = _positional_arity(self.function, config.kwargs)
        if self.arity not in (1, 2):
            raise ConfigError(
                f"config key 'judge.function': {config.function} must take (completion) or (prompt, completion), "
                f"but its signature is {inspect.signature(self.function)}"
            )

    def _as_score(self, value: Any) -> float | None:
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if math.isnan(score):
            if not self.summary().get("unparsable"):  # once: the rest are counted, not logged
                log.warning("judge function %s returned %r, not a number; counted as unparsable",
                            self.config.function, value)
            self.count("unparsable", example=repr(value))
            return None
        return score

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float | None]:
        check_lengths(prompts, completions)
        kwargs = self.config.kwargs
        scores = []
        for prompt, completion in zip(prompts, completions, strict=True):
            args = (completion,) if self.arity == 1 else (prompt, completion)
            scores.append(self._as_score(self.function(*args, **kwargs)))
        return self.tally(scores)
