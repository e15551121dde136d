"""Shared fixtures: a tiny Llama + local tokenizer saved once per session, small pair files, a base config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def snippets(sentiment_at_least: float | None = None, at_most: float | None = None, limit: int = 40) -> list[str]:
    from preftune.testing import RESOURCES

    rows = (RESOURCES / "movie_review_snippets.tsv").read_text(encoding="utf-8").splitlines()[1:]
    out = []
    for row in rows:
        _, rating, text = row.split("\t", 2)
        if (sentiment_at_least is None or float(rating) >= sentiment_at_least) and (
                at_most is None or float(rating) <= at_most) and len(text) < 120:
            out.append(text)
        if len(out) == limit:
            break
    return out


def write_pairs(path: Path, count: int) -> Path:
    good, bad = snippets(2.0, limit=count), snippets(at_most=-2.0, limit=count)
    prompts = ["Write a movie review:", "Review this film:", "Your opinion of the movie:"]
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            row = {"prompt": prompts[i % 3], "chosen": " " + good[i], "rejected": " " + bad[i]}
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from preftune.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """Same architecture and tokenizer, other random weights: a reference that differs from the policy."""
    from preftune.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-other"), seed=1)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 24)


@pytest.fixture
def base_config(tiny_model_dir, pairs_file, tmp_path) -> dict:
    """A fast DPO run: 24 pairs, batch 4, 3 steps, evaluation on 25% held out, no progress bar."""
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_file": str(pairs_file), "eval_fraction": 0.25, "max_length": 96, "max_prompt_length": 32},
        "objective": {"name": "dpo", "beta": 0.1},
        "reference": {"cache_dir": str(tmp_path / "refcache")},
        "training": {
            "output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 3, "learning_rate": 1e-3,
            "logging_steps": 1, "save_steps": 2, "progress_bar": False, "eval_batch_size": 8, "seed": 3,
        },
    }


@pytest.fixture(scope="module")
def launch_pairs(tmp_path_factory) -> tuple[Path, Path]:
    """For the multi-process tests (launching.py): 17 training pairs (global micro-batches of 4, 4, 4, 4, 1) and 5 held-out pairs (batches of 4, 1)."""
    folder = tmp_path_factory.mktemp("pairs")
    rows = write_pairs(folder / "all.jsonl", 22).read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "train.jsonl").write_text("".join(rows[:17]), encoding="utf-8")
    (folder / "eval.jsonl").write_text("".join(rows[17:]), encoding="utf-8")
    return folder / "train.jsonl", folder / "eval.jsonl"


@pytest.fixture(scope="module")
def dpo_recipe(tiny_model_dir, launch_pairs, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("dpo")
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_file": str(launch_pairs[0]), "eval_file": str(launch_pairs[1]), "max_length": 96, "max_prompt_length": 32},
        "objective": {"name": "dpo", "beta": 0.1},
        "reference": {"cache_dir": str(folder / "refcache")},
        "training": {"output_dir": str(folder / "two"), "batch_size": 2, "eval_batch_size": 2, "max_steps": 5,
                     "learning_rate": 1e-3, "adam_epsilon": 1e-6, "logging_steps": 1, "save_steps": 1,
                     "save_total_limit": None, "progress_bar": False, "tensorboard": False, "seed": 3},
    }


