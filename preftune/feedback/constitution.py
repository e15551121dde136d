"""A constitution (Bai et al. 2022, "Constitutional AI", §3 and Appendix C): principles, each a critique
request, a revision request and a comparison question; and the seeded draw of one principle per use."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import ConfigError

BUNDLED = Path(__file__).resolve().parents[1] / "resources" / "constitution.yaml"


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # asked after the answer: what is wrong with it under this principle
    revision: str  # asked after the critique: rewrite the answer
    comparison: str  # asked of a judge comparing two answers


def load_constitution(path: str | Path | None, key: str) -> list[Principle]:
    """Principles from a YAML list of {name, critique, revision, comparison}; "" or None = the bundled one."""
    path = Path(path) if path else BUNDLED
    if not path.is_file():
        raise ConfigError(f"config key '{key}': constitution file {path} does not exist")
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: a constitution is a non-empty YAML list of principles")
    fields = ("name", "critique", "revision", "comparison")
    principles = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(not isinstance(entry.get(f), str) or not entry[f].strip() for f in fields) \
                or set(entry) - set(fields):
            raise ConfigError(f"{path}: principle {i + 1} needs exactly the text fields {', '.join(fields)}, got {entry!r}")
        principles.append(Principle(**{f: entry[f].strip() for f in fields}))
    return principles


def draw(principles: list[Principle], *key: object) -> Principle:
    """The principle for ``key`` (a seed and whatever identifies the use): the same key, the same principle."""
    digest = hashlib.sha256(repr(key).encode()).hexdigest()
    return random.Random(digest).choice(principles)
