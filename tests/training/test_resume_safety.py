"""Resuming never mixes two experiments, and a resumed run's logged curve is the uninterrupted one exactly."""

from __future__ import annotations

import copy
import json

import pytest

from preftune.config import config_from_dict
from preftune.training import train
from preftune.training.fingerprint import RunMismatchError


def run(raw: dict, *overrides: str):
    return train(config_from_dict(copy.deepcopy(raw), list(overrides)))


def test_a_finished_run_is_not_resumed_with_other_settings_or_data(base_config, tmp_path, pairs_file):
    raw = copy.deepcopy(base_config)
    raw["training"].update(max_steps=2, save_steps=None, eval_before_training=False)
    run(raw)
    with pytest.raises(RunMismatchError, match=r"objective.beta: 0.1 there, 0.2 now.*new training.output_dir, or "
                                               r"set training.resume: never"):
        run(raw, "objective.beta=0.2")
    other = tmp_path / "other.jsonl"
    rows = pairs_file.read_text().splitlines()
    other.write_text("\n".join(rows[::-1]) + "\n")  # the same rows in another order: other held-out split
    with pytest.raises(RunMismatchError, match=r"training data \(its content as tokenized\) differs"):
        run(raw, f"data.train_file={other}")
    # output-only keys may change; resume: never starts over and trains again
    assert run(raw, "training.logging_steps=5", "training.progress_bar=true").steps == 2
    again = run(raw, "objective.beta=0.2", "training.resume=never")
    assert [r["step"] for r in again.history if "loss" in r] == [1, 2]


def test_the_logging_window_that_spans_a_resume_is_the_uninterrupted_one(base_config, tmp_path, monkeypatch):
    """logging_steps 3, checkpoint at step 4, crash in step 6: the resumed row for step 6 averages steps 4-6
    like the uninterrupted run's (step 4's loss comes from the checkpoint), so the two files are identical."""
    from preftune.training import loop

    raw = copy.deepcopy(base_config)
    raw["training"].update(max_steps=6, logging_steps=3, save_steps=4, eval_before_training=False,
                           learning_rate=1e-2)
    whole = run(raw, f"training.output_dir={tmp_path / 'whole'}")
    original = loop.Loop._optimizer_step

    def crash(self, step, stats):
        if step == 5:
            raise RuntimeError("killed")
        return original(self, step, stats)

    monkeypatch.setattr(loop.Loop, "_optimizer_step", crash)
    with pytest.raises(RuntimeError):
        run(raw, f"training.output_dir={tmp_path / 'resumed'}")
    monkeypatch.setattr(loop.Loop, "_optimizer_step", original)
    resumed = run(raw, f"training.output_dir={tmp_path / 'resumed'}")

    def rows(result):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in result.history if "loss" in r]

    assert [r["step"] for r in rows(resumed)] == [3, 6]
    assert rows(resumed) == rows(whole)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["logging_window"]["counts"]["loss"] == raw["training"]["batch_size"]  # step 4's examples
