"""Checkpoints: atomic writes, pruning, exact restore, refusal of a mismatched model, and no unpickling: a
pickle planted in a checkpoint (new or old file names) is refused and never runs."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from preftune.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from preftune.training.state_files import load_state, save_state


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


def test_state_files_keep_tuples_int_keys_exact_floats_and_every_dtype(tmp_path):
    """What optimizer, scheduler and RNG states hold comes back equal and of the same types: a tuple stays a
    tuple (Adam's betas), int keys stay ints (optimizer state), 0.1 + 0.2 keeps its last bit, inf/nan survive,
    tensors keep dtype and bits (0-d included), a numpy uint32 array stays one (numpy's RNG state)."""
    value = {0: {"step": torch.tensor(3.0), "half": torch.randn(2, 3).to(torch.bfloat16)},
             "groups": [{"betas": (0.9, 0.999), "lr": 0.1 + 0.2, "limits": [math.inf, -math.inf], "fused": None}],
             "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 623, 0, 0.0), "text": "x"}
    save_state(value, tmp_path, "thing")
    back = load_state(tmp_path, "thing")
    assert back["groups"] == value["groups"] and type(back["groups"][0]["betas"]) is tuple
    assert back["groups"][0]["lr"] == 0.30000000000000004
    assert set(back) == {0, "groups", "numpy", "text"}
    for key in ("step", "half"):
        torch.testing.assert_close(back[0][key], value[0][key], rtol=0, atol=0)
        assert back[0][key].dtype == value[0][key].dtype and back[0][key].shape == value[0][key].shape
    assert back["numpy"][1].dtype == np.uint32 and back["numpy"][1].tolist() == [0, 1, 2, 3, 4]
    assert back["numpy"][0] == "MT19937" and back["numpy"][2:] == (623, 0, 0.0)
    (tmp_path / "nan.json").write_text('{"tuple": [NaN, 1]}')
    assert math.isnan(load_state(tmp_path, "nan")[0])


def test_a_checkpoint_holds_no_pickle(tmp_path):
    """Every file is JSON or safetensors: neither a pickle (opcode PROTO, 0x80) nor torch.save's zip ("PK")."""
    model, optimizer, scheduler = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, keep=None)
    files = sorted(p.name for p in path.iterdir())
    assert files == ["objective_state.safetensors", "optimizer.json", "optimizer.safetensors", "rng.json",
                     "rng.safetensors", "scheduler.json", "trainable.safetensors", "trainer_state.json"]
    for file in path.iterdir():
        assert file.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x04", b"\x80\x05", b"PK")


class Planted:
    """Unpickling this opens (creates) ``marker``: what a malicious checkpoint would do, minus the damage."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker) -> None:
    """``path`` becomes a torch.save file (a zip holding a pickle) that creates ``marker`` when unpickled."""
    torch.save({"state": {}, "param_groups": [{"params": [0], "lr": Planted(marker)}]}, path)


def test_the_planted_pickle_is_live(tmp_path):
    """Control: the payload the next tests plant does run when unpickled the way preftune used to."""
    plant(tmp_path / "optimizer.pt", tmp_path / "control")
    torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert (tmp_path / "control").exists()


@pytest.mark.parametrize("target", ["optimizer.safetensors", "optimizer.json", "rng.json"])
def test_a_pickle_planted_in_a_state_file_is_refused_unrun(tmp_path, target):
    model, optimizer, scheduler = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path / "run", 1, model, optimizer, scheduler, {}, keep=None)
    plant(path / target, tmp_path / "marker")
    with pytest.raises(CheckpointError, match=f"cannot be resumed: .*{target} is not a") as info:
        load_checkpoint(path, model, optimizer, scheduler)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "marker").exists()


def test_an_old_pickle_checkpoint_is_refused_with_how_to_start_over(tmp_path):
    """The previous format's file names, each holding the payload: refused before any file is opened."""
    model, optimizer, scheduler = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path / "run", 1, model, optimizer, scheduler, {}, keep=None)
    for name in ("optimizer", "scheduler", "rng"):
        for suffix in (".json", ".safetensors"):
            (path / f"{name}{suffix}").unlink(missing_ok=True)
        plant(path / f"{name}.pt", tmp_path / f"marker-{name}")
    with pytest.raises(CheckpointError, match="pickle format .* training.resume: never or a new training.output_dir"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert not list(tmp_path.glob("marker-*"))


def test_a_scheduler_file_cannot_set_other_attributes(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, keep=None)
    state = json.loads((path / "scheduler.json").read_text())
    state["dict"].append(["optimizer", "hijacked"])
    (path / "scheduler.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"scheduler state does not fit this run \(unexpected entries \['optimizer'\]"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert scheduler.optimizer is optimizer


def test_resuming_from_a_planted_checkpoint_stops_before_the_pickle_runs(base_config, tmp_path, capsys):
    """A checkpoint copied from elsewhere with a pickle in its optimizer file, resumed through ``train`` and
    through the command line; then the same folder in the old format (optimizer.pt, ...)."""
    from preftune.cli import main
    from preftune.config import config_from_dict
    from preftune.training import train

    raw = copy.deepcopy(base_config)
    train(config_from_dict(copy.deepcopy(raw), []))
    elsewhere = shutil.copytree(latest_checkpoint(raw["training"]["output_dir"]), tmp_path / "downloaded")
    plant(elsewhere / "optimizer.safetensors", tmp_path / "marker")
    overrides = [f"training.output_dir={tmp_path / 'resumed'}", f"training.resume={elsewhere}"]
    with pytest.raises(CheckpointError, match="optimizer.safetensors is not a safetensors file"):
        train(config_from_dict(copy.deepcopy(raw), overrides))
    assert not (tmp_path / "marker").exists()

    for name in ("optimizer", "scheduler", "rng"):
        for stale in elsewhere.glob(f"{name}.*"):
            stale.unlink()
        plant(elsewhere / f"{name}.pt", tmp_path / "marker")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["train", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
    assert err.startswith(f"preftune: error: checkpoint {elsewhere} is in the pickle format")
    assert "training.resume: never" in err
    assert not (tmp_path / "marker").exists()
