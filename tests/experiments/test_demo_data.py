"""The demo's preference pairs: thresholds checked against the TSV itself, disjoint splits, determinism."""

from __future__ import annotations

import json

import pytest

from preftune.experiments.demo import (
    CHOSEN_AT_LEAST,
    PROMPTS,
    REJECTED_AT_MOST,
    build_demo_pairs,
    split_demo_overrides,
)
from preftune.testing import RESOURCES


def tsv_ratings() -> dict[str, list[float]]:
    """text -> every rating it has in the TSV, read here independently of preftune.experiments.demo."""
    ratings: dict[str, list[float]] = {}
    for line in (RESOURCES / "movie_review_snippets.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        _, rating, text = line.split("\t", 2)
        ratings.setdefault(text.strip(), []).append(float(rating))
    return ratings


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def texts(rows, side):
    return [row[side][0]["content"] for row in rows]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    train_path, eval_path = build_demo_pairs(tmp_path_factory.mktemp("demo"), seed=3, n_train=200, n_eval=50)
    return read(train_path), read(eval_path)


def test_sizes_and_conversational_shape(demo_files):
    train_rows, eval_rows = demo_files
    assert (len(train_rows), len(eval_rows)) == (200, 50)
    for row in train_rows + eval_rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        (user,), (chosen,), (rejected,) = row["prompt"], row["chosen"], row["rejected"]
        assert user["role"] == "user" and user["content"] in PROMPTS
        assert chosen["role"] == rejected["role"] == "assistant"
        assert chosen["content"] and rejected["content"]


def test_rating_thresholds_hold_against_the_tsv(demo_files):
    """Chosen: every rating of that text >= +2; rejected: every rating <= -2 (the TSV decides, not demo.py)."""
    ratings = tsv_ratings()
    assert (CHOSEN_AT_LEAST, REJECTED_AT_MOST) == (2.0, -2.0)
    for rows in demo_files:
        assert all(min(ratings[t]) >= 2.0 for t in texts(rows, "chosen"))
        assert all(max(ratings[t]) <= -2.0 for t in texts(rows, "rejected"))


def test_train_and_held_out_share_no_snippet(demo_files):
    train_rows, eval_rows = demo_files
    train_texts = set(texts(train_rows, "chosen") + texts(train_rows, "rejected"))
    eval_texts = set(texts(eval_rows, "chosen") + texts(eval_rows, "rejected"))
    assert not train_texts & eval_texts
    # and no snippet repeats inside a split either
    assert len(train_texts) == 2 * len(train_rows) and len(eval_texts) == 2 * len(eval_rows)


def test_same_seed_same_bytes_other_seed_other_pairs(tmp_path):
    a = build_demo_pairs(tmp_path / "a", seed=7, n_train=30, n_eval=10)
    b = build_demo_pairs(tmp_path / "b", seed=7, n_train=30, n_eval=10)
    c = build_demo_pairs(tmp_path / "c", seed=8, n_train=30, n_eval=10)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    assert len(set(texts(read(a[0]), "prompt"))) > 1  # several phrasings, not one


def test_asking_for_more_pairs_than_snippets_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="positive and .* negative"):
        build_demo_pairs(tmp_path, n_train=2000, n_eval=100)


def test_demo_options_are_split_from_config_overrides():
    options, rest = split_demo_overrides(["demo.n_train=64", "training.max_steps=3", "demo.seed=5"])
    assert options["n_train"] == 64 and options["seed"] == 5 and rest == ["training.max_steps=3"]
    with pytest.raises(ValueError, match="demo.n_eval"):
        split_demo_overrides(["demo.n_tran=64"])
