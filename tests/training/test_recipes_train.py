"""Every training recipe in configs/ trains the tiny model end to end (2 optimizer steps), on the example
data of its objective's shape, with the recipe's own objective, reference and LoRA settings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from preftune.config import load_config
from preftune.training import train

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "# Run:  preftune train " in p.read_text()
                 or "# Run:  preftune sft " in p.read_text())


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_the_tiny_model(path, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repository
    command = "sft" if "# Run:  preftune sft " in path.read_text() else "train"
    config = load_config(path, [
        f"model.name_or_path={tiny_model_dir}", f"training.output_dir={tmp_path / 'run'}",
        "training.max_steps=2", "training.batch_size=4", "training.eval_batch_size=16", "training.precision=fp32",
        "training.save_steps=null", "training.eval_steps=null", "training.logging_steps=1",
        "training.progress_bar=false", "training.tensorboard=false", "training.learning_rate=1e-3",
        "data.max_length=64", "data.max_prompt_length=32", "data.eval_fraction=0.25",
        f"reference.cache_dir={tmp_path / 'cache'}",
    ])
    if command == "sft":
        config.objective.name, config.objective.params = "sft", {}
    # the recipe's own data file, cut to its first 24 rows: 2 steps of 4 need no more, and precomputing
    # reference log-probs for the whole file would dominate the test's time
    head = tmp_path / Path(config.data.train_file).name
    head.write_text("".join((ROOT / config.data.train_file).read_text().splitlines(keepends=True)[:24]))
    config.data.train_file = str(head)
    result = train(config, command=command)
    rows = [row for row in result.history if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert result.final_dir is not None and (result.final_dir / "README.md").is_file()
    assert result.eval_after is not None and math.isfinite(result.eval_after["eval/loss"])
