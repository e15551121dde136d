"""Checkpoints: atomic writes, pruning, exact restore, refusal of a mismatched model."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].weight.requires_grad_(False)  # frozen parameters are not part of a checkpoint
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path, 7, model, optimizer, scheduler, {"epoch": 0.5}, keep=None)
    expected_draw = torch.rand(3)  # the RNG stream right after the save
    other, other_opt, other_sched = _model_and_optimizer(1)
    state = load_checkpoint(path, other, other_opt, other_sched)
    assert state == {"epoch": 0.5, "step": 7, "tensors": {}}
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert other_sched.get_last_lr() == scheduler.get_last_lr()
    first = next(iter(optimizer.state.values()))["exp_avg"]
    torch.testing.assert_close(next(iter(other_opt.state.values()))["exp_avg"], first, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)


def test_half_written_checkpoints_are_never_the_latest(tmp_path):
    """A crash mid-write leaves a .tmp folder, or (copied by hand) a step folder without its state file:
    neither counts. The next save cleans up the leftover temporary folder."""
    model, optimizer, scheduler = _model_and_optimizer(0)
    good = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {}, keep=None)
    (tmp_path / "checkpoints" / ".tmp-step-00000004-99999").mkdir()
    (tmp_path / "checkpoints" / "step-00000009").mkdir()
    assert latest_checkpoint(tmp_path) == good
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {}, keep=None)
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000004-99999").exists()


def test_keep_prunes_the_oldest(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer(0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())["step"] == 4


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, keep=None)
    model[1].weight.requires_grad_(True)  # e.g. resumed with another LoRA / freezing setting
    with pytest.raises(ValueError, match="does not match this model's trainable parameters"):
        load_checkpoint(path, model, optimizer, scheduler)
