"""The bundled movie-review snippets: 10,604 Rotten Tomatoes sentences, each with the mean sentiment rating of
20 or more people on -4 (extremely negative) .. +4 (extremely positive).

Source: the ground truth of Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
Social Media Text", ICWSM 2014 (MIT licence). The demo, the sentiment reward model and the frontier all read
them through ``read_snippets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SNIPPETS = Path(__file__).resolve().parents[1] / "resources" / "movie_review_snippets.tsv"


@dataclass(frozen=True)
class Snippet:
    text: str
    rating: float
    id: str = ""


def read_snippets(path: str | Path | None = None) -> list[Snippet]:
    """Every distinct text of an ``id<TAB>rating<TAB>text`` file with one header line (the bundled snippets by
    default), in file order; a text repeated under another id keeps its first rating."""
    path = Path(path) if path else SNIPPETS
    seen: dict[str, Snippet] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines()[1:], 2):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            snippet = Snippet(parts[2].strip(), float(parts[1]), parts[0])
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: expected id<TAB>rating<TAB>text, got {line[:60]!r}") from exc
        if snippet.text:
            seen.setdefault(snippet.text, snippet)
    return list(seen.values())
