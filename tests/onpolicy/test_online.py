"""``preftune online``: online DPO's step is the offline DPO step on the same sampled pairs; SPO runs; resume
reproduces the uninterrupted run; judge failures and ties are counted; config errors name the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.config import ConfigError, config_from_dict
from preftune.feedback.judges import build_judge
from preftune.onpolicy.online import train_online
from preftune.onpolicy.online_config import online_config_from_dict
from preftune.training import train
from preftune.training.schedule import BatchSchedule

JUDGES = str(Path(__file__).with_name("judges.py"))
PROMPTS = ["The movie was", "I think this film", "A story about", "Honestly the plot", "The actors were",
           "My favourite scene"]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def recipe(tmp_path: Path, model: Path, prompts: Path, **online) -> dict:
    return {
        "model": {"name_or_path": str(model)},
        "data": {"max_length": 40, "max_prompt_length": 16},
        "objective": {"name": "dpo", "beta": 0.1},
        "training": {"output_dir": str(tmp_path / "online"), "batch_size": 3, "max_steps": 2, "learning_rate": 1e-2,
                     "logging_steps": 1, "save_steps": 1, "progress_bar": False, "tensorboard": False, "seed": 5},
        "online": {"prompts": {"file": str(prompts), "chat_template": False},
                   "sampling": {"num_samples": 2, "max_new_tokens": 6, "seed": 11},
                   "judge": {"type": "function", "function": f"{JUDGES}:distinct"}, **online},
    }


def judge(name: str = "distinct"):
    return build_judge({"type": "function", "function": f"{JUDGES}:{name}"})


def test_online_dpo_step_equals_the_offline_dpo_step_on_the_same_pairs(tmp_path, tiny_model_dir, prompts_file):
    """One online step over 3 prompts: sample two completions each, the judge (a distinct score per text, so no
    ties) orders them, DPO trains. The same 3 pairs written to a file and trained offline for one step of 3 from
    the same model, seed and optimizer must give the same weights: sampling happens under a forked RNG and
    changes nothing else."""
    raw = recipe(tmp_path, tiny_model_dir, prompts_file)
    raw["training"]["max_steps"] = 1
    config = online_config_from_dict(raw)
    captured = {}
    from preftune.onpolicy import online as online_module

    original = online_module.OnlineTask.judged_examples

    def spy(self, positions, samples, counts):
        examples = original(self, positions, samples, counts)
        captured["samples"], captured["examples"] = samples, examples
        return examples

    online_module.OnlineTask.judged_examples = spy
    try:
        result = train_online(config, judge=judge())
    finally:
        online_module.OnlineTask.judged_examples = original
    assert len(captured["examples"]) == 3
    for (a, b), example in zip(captured["samples"], captured["examples"], strict=True):
        chosen, rejected = (a, b) if float(int(__import__("hashlib").md5(a.encode()).hexdigest()[:8], 16)) > float(
            int(__import__("hashlib").md5(b.encode()).hexdigest()[:8], 16)) else (b, a)
        assert (example.chosen, example.rejected) == (chosen, rejected)
    # the offline run visits its file in the order randperm(3) of its seed: lay the rows out so that it meets
    # them in the online batch's order, and the sums run in the same order
    order = BatchSchedule(3, 3, 1, seed=5).micro_batch(0)
    rows = [None] * 3
    for position, example in zip(order, captured["examples"], strict=True):
        rows[position] = {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    offline = copy.deepcopy(raw)
    offline.pop("online")
    offline["data"]["train_file"] = str(pairs)
    offline["training"]["output_dir"] = str(tmp_path / "offline")
    train(config_from_dict(offline))
    online_weights = load_file(str(result.run_dir / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    offline_weights = load_file(str(tmp_path / "offline" / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    assert online_weights.keys() == offline_weights.keys()
    for name, tensor in online_weights.items():
        torch.testing.assert_close(tensor, offline_weights[name], rtol=0, atol=0)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    offline_rows = [json.loads(x) for x in (tmp_path / "offline" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(offline_rows[0]["loss"], abs=1e-6)
    assert rows[0]["online/kept"] == 1.0 and rows[0]["online/ties"] == 0.0


def test_resumed_online_run_continues_the_same_curve(tmp_path, tiny_model_dir, prompts_file):
    """Kill after step 1 (checkpointed), rerun: steps 2-3 sample the same completions and log the same losses as
    an uninterrupted run."""
    raw = recipe(tmp_path, tiny_model_dir, prompts_file)
    raw["training"].update(max_steps=3, batch_size=2)
    whole = train_online(online_config_from_dict(copy.deepcopy(raw)), judge=judge())
    raw["training"]["output_dir"] = str(tmp_path / "killed")
    from preftune.onpolicy import online as online_module

    original, calls = online_module.OnlineTask.loss, []

    def dies_at_step_two(self, module, batch, step, micro, weight, stats):
        if step == 1:
            raise RuntimeError("killed")
        calls.append(step)
        return original(self, module, batch, step, micro, weight, stats)

    online_module.OnlineTask.loss = dies_at_step_two
    try:
        with pytest.raises(RuntimeError, match="killed"):
            train_online(online_config_from_dict(copy.deepcopy(raw)), judge=judge())
    finally:
        online_module.OnlineTask.loss = original
    resumed = train_online(online_config_from_dict(copy.deepcopy(raw)), judge=judge())
    losses = [r["loss"] for r in whole.history if "loss" in r]
    again = [r["loss"] for r in resumed.history if "loss" in r]
    assert len(losses) == 3 and again == pytest.approx(losses, abs=1e-7)


def test_ties_and_identical_samples_are_skipped_and_counted(tmp_path, tiny_model_dir, prompts_file):
    """A judge that scores every text 1.0 ties every pair: nothing is trained (zero loss), every prompt counted
    under online/ties (or identical), none kept."""
    raw = recipe(tmp_path, tiny_model_dir, prompts_file)
    raw["training"]["max_steps"] = 1
    result = train_online(online_config_from_dict(raw), judge=_constant_judge())
    row = next(r for r in result.history if "online/kept" in r)
    assert row["online/kept"] == 0.0
    assert row["online/ties"] + row["online/identical"] == pytest.approx(1.0)
    assert row["loss"] == 0.0 and row["grad_norm"] == 0.0


def _constant_judge():
    return build_judge({"type": "function", "function": f"{JUDGES}:constant"})


def test_spo_trains_on_win_rate_rewards(tmp_path, tiny_model_dir, prompts_file):
    raw = recipe(tmp_path, tiny_model_dir, prompts_file, method="spo", spo_beta=0.1)
    raw.pop("objective")
    raw["online"]["sampling"]["num_samples"] = 3
    result = train_online(online_config_from_dict(raw), judge=judge())
    rows = [r for r in result.history if "loss" in r]
    assert len(rows) == 2 and all(r["online/kept"] == 1.0 for r in rows)
    assert rows[0]["spo/reward"] == pytest.approx(0.5)  # win rates of K samples average ½ (no ties)
    assert (result.final_dir / "README.md").read_text().count("spo") > 0


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["data"].update(train_file="x.jsonl"), r"online training samples its own data"),
    (lambda r: r["online"]["sampling"].update(num_samples=3), r"online.sampling.num_samples': online DPO samples two"),
    (lambda r: r.update(reference={"precompute": True}), r"reference.precompute"),
    (lambda r: r["online"].update(method="spo"), r"spo's loss is fixed"),
    (lambda r: r["online"].update(judge={}), r"online.judge' is missing"),
    (lambda r: r["online"].update(min_margin=0.5), r"online.min_margin"),
    (lambda r: r["online"].update(judge={"type": "function", "functon": "x:y"}), r"unknown config key 'online.judge.functon'"),
    (lambda r: r.update(objective={"name": "kto"}), r"online DPO trains an objective on pairs"),
])
def test_config_errors_name_the_key(tmp_path, tiny_model_dir, prompts_file, change, message):
    raw = recipe(tmp_path, tiny_model_dir, prompts_file)
    change(raw)
    with pytest.raises(ConfigError, match=message):
        online_config_from_dict(raw)
