"""The package's shape: no import cycles (function-level imports included), each folder says in its
``__init__`` what lives there, and the few layering rules DESIGN.md names hold."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "preftune"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its file, relative imports resolved; ``from X
    import y`` counts as importing X.y when that is a module, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_every_folder_says_what_lives_there():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        summary = (doc or "").split("\n\n")[0]
        assert summary and len(summary) < 300, f"{init.relative_to(PACKAGE.parent)}: a docstring opening with a line or two"


def test_layers():
    """Objectives see only each other (and torch); data never reaches into training or above; nothing in
    the library imports the experiments (the command line and the test helpers may)."""
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("preftune.objectives"):
            assert all(t.startswith("preftune.objectives") for t in targets), (name, targets)
        if name.startswith("preftune.data"):
            above = ("preftune.training", "preftune.feedback", "preftune.evaluation", "preftune.reward",
                     "preftune.experiments")
            assert not [t for t in targets if t.startswith(above)], (name, targets)
        if not name.startswith(("preftune.experiments", "preftune.cli", "preftune.testing")):
            assert not [t for t in targets if t.startswith("preftune.experiments")], (name, targets)


# Run in a fresh interpreter: `preftune train` for one step, then the preftune modules loaded when AdamW steps.
_TRAINING_PATH = """
import json, sys, torch
step = torch.optim.AdamW.step
def first_step(self, *args, **kwargs):
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "preftune")))
    sys.stdout.flush()
    torch.optim.AdamW.step = step
    return step(self, *args, **kwargs)
torch.optim.AdamW.step = first_step
from preftune.cli import main
main(["train", sys.argv[1]])
"""


def unit(module: str) -> str:
    """The entry of ``preftune/`` a module belongs to: ``preftune.training.loop`` -> ``training``; the package
    itself -> ``preftune``."""
    return module.split(".")[1] if "." in module else module


def test_units_group_modules_by_their_entry_in_the_package():
    assert unit("preftune.training.loop") == "training" and unit("preftune.cli") == "cli"
    assert unit("preftune") == "preftune" and unit("preftune.objectives.dpo") == "objectives"


def test_the_training_path_passes_through_few_units(tiny_model_dir, pairs_file, tmp_path):
    """Issue 8's measure: the entries of ``preftune/`` (a module, or a folder counted once, as ``data/`` and
    ``objectives/`` always were) loaded between ``preftune train`` and the first optimizer step. The flat
    package before the regroup loaded 17: preftune, checkpoint, cli, config, data, export, inputs, logps,
    metrics, modeling, objectives, pipeline, reference, schedule, step, sync, trainer. Now the training
    pieces are one folder and the experiments, evaluation, reward and on-policy code stay out of the path."""
    import json
    import subprocess
    import sys

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name_or_path: {tiny_model_dir}}}\n"
                      f"data: {{train_file: {pairs_file}, max_length: 32, max_prompt_length: 16}}\n"
                      f"training: {{output_dir: {tmp_path / 'run'}, max_steps: 1, batch_size: 2, progress_bar: false}}\n",
                      encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", _TRAINING_PATH, str(recipe)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[0])
    units = sorted({unit(m) for m in loaded})
    assert units == ["atomic", "cli", "config", "data", "feedback", "modeling", "objectives", "preftune",
                     "training", "user_code"], units
    assert len(units) < 17
