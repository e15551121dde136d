"""The README's objectives table is generated from ``OBJECTIVES``; this test fails when the two drift apart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from preftune.objectives import OBJECTIVES
from preftune.objectives.catalog import (
    END_MARKER,
    REGENERATE,
    START_MARKER,
    markdown_table,
    parameters_with_defaults,
    readme_block,
    with_table,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_matches_objectives():
    assert README.exists(), f"{README} does not exist; create it with: {REGENERATE}"
    block = readme_block(README.read_text(encoding="utf-8"))
    assert block is not None, (
        f"{README.name} has no '{START_MARKER}' ... '{END_MARKER}' block; add it with: {REGENERATE}"
    )
    assert block == markdown_table(), f"the objectives table in {README.name} is stale; regenerate it with: {REGENERATE}"


def test_one_row_per_objective_sorted_with_traits():
    rows = markdown_table().splitlines()[2:]
    names = [row.split("|")[1].strip().strip("`") for row in rows]
    assert names == sorted(OBJECTIVES)
    for row, name in zip(rows, names, strict=True):
        objective = OBJECTIVES[name]
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert cells[2] == ", ".join(objective.shapes)
        assert cells[3] == ("yes" if objective.needs_reference else "no")
        for f in dataclasses.fields(objective.params):
            assert f"{f.name}={f.default!r}" in cells[4]


def test_parameters_with_defaults_formats():
    """Floats and strings are written as Python literals, in field order; no parameters is a dash."""
    assert parameters_with_defaults(OBJECTIVES["dpo"]).startswith("beta=0.1, label_smoothing=0.0, ")
    assert "f_divergence='reverse_kl'" in parameters_with_defaults(OBJECTIVES["dpo"])
    assert parameters_with_defaults(OBJECTIVES["exo"]) == "beta=0.1, label_smoothing=0.001"
    assert parameters_with_defaults(OBJECTIVES["slic"]) == "delta=1.0, lambda_=0.1"
    assert parameters_with_defaults(OBJECTIVES["sft"]) == "—"


@pytest.mark.parametrize(
    "before",
    ["", "# preftune\n", "# preftune\n\nIntro.", f"# t\n\n{START_MARKER}\nold table\n{END_MARKER}\n\n## After\ntext\n"],
)
def test_with_table_replaces_only_the_block(before):
    after = with_table(before)
    assert readme_block(after) == markdown_table()
    assert after.count(START_MARKER) == after.count(END_MARKER) == 1
    if START_MARKER in before:  # text around the block is untouched
        assert after.startswith(before[: before.index(START_MARKER)])
        assert after.endswith(before[before.index(END_MARKER) + len(END_MARKER) :])
    else:  # appended after the existing text
        assert after.startswith(before)
    assert with_table(after) == after  # idempotent
