"""The README's objectives table, generated from ``OBJECTIVES`` so the documentation cannot drift from the code.

``python -m preftune.objectives.catalog`` prints the table; ``--write README.md`` replaces the block between
the markers below in place (or appends the markers and the block when the file has none) and touches nothing
else. ``tests/objectives/test_catalog.py`` fails when the README's block differs from :func:`markdown_table`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from . import OBJECTIVES, Objective

START_MARKER = "<!-- objectives:start -->"
END_MARKER = "<!-- objectives:end -->"
REGENERATE = "python -m preftune.objectives.catalog --write README.md"


def parameters_with_defaults(objective: Objective) -> str:
    """``beta=0.1, label_smoothing=0.0`` from the params dataclass, in field order; ``—`` when there are none."""
    parts = [f"{f.name}={f.default!r}" for f in dataclasses.fields(objective.params)]
    return ", ".join(parts) if parts else "—"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table() -> str:
    """One row per objective in ``OBJECTIVES``, sorted by name: name, paper, data shapes, reference, parameters."""
    lines = [
        "| Objective | Paper | Data shape | Needs reference | Parameters (defaults) |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(OBJECTIVES):
        objective = OBJECTIVES[name]
        params = parameters_with_defaults(objective)
        lines.append(
            f"| `{name}` | {_cell(objective.paper)} | {', '.join(objective.shapes)} | "
            f"{'yes' if objective.needs_reference else 'no'} | {'`' + params + '`' if params != '—' else params} |"
        )
    return "\n".join(lines)


def readme_block(text: str) -> str | None:
    """The text between the markers (stripped), or ``None`` when the markers are missing or out of order."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        return None
    return text[start + len(START_MARKER) : end].strip()


def with_table(text: str) -> str:
    """``text`` with the block between the markers replaced by the current table (appended if no markers)."""
    block = f"{START_MARKER}\n{markdown_table()}\n{END_MARKER}"
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        separator = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return f"{text}{separator}{block}\n"
    return text[:start] + block + text[end + len(END_MARKER) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print or write the README table of preference objectives.")
    parser.add_argument("--write", metavar="PATH", help="rewrite the block between the markers in PATH")
    args = parser.parse_args(argv)
    if args.write is None:
        print(markdown_table())
        return 0
    path = Path(args.write)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    updated = with_table(text)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    print(f"{path}: objectives table {'updated' if updated != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
