"""``preftune rso`` on the tiny model: candidates from the SFT policy, Algorithm 1 keeps M per prompt, the
tournament labels M - 1 pairs, hinge trains; a rerun skips every finished stage; config errors name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from preftune.config import ConfigError, build_section
from preftune.feedback.judges import build_judge
from preftune.onpolicy.rso_run import RSOConfig, load_rso_config, run_rso

JUDGES = str(Path(__file__).with_name("judges.py"))


def settings(tmp_path: Path, model: Path) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["The movie was", "I think", "A story"]))
    return {"output_dir": str(tmp_path / "out"), "policy": {"name_or_path": str(model)},
            "prompts": {"file": str(prompts), "chat_template": False},
            "sampling": {"num_samples": 8, "max_new_tokens": 6, "batch_size": 3},
            "reward": {"path": "unused: a judge is passed"}, "rejection": {"beta": 1.0, "num_samples": 4},
            "train": {"objective": {"name": "hinge", "beta": 0.5}, "data": {"max_length": 32, "max_prompt_length": 16},
                      "training": {"batch_size": 3, "max_steps": 2, "learning_rate": 1e-3, "tensorboard": False,
                                   "eval_before_training": False}},
            "progress_bar": False}


def test_rso_pairs_come_from_accepted_candidates_by_tournament(tmp_path, tiny_model_dir, monkeypatch):
    """With the judge 'distinct' no two texts tie: each prompt gives exactly M - 1 = 3 pairs, every chosen scores
    above its rejected, and every completion in a pair is one of that prompt's candidates."""
    from judges import distinct

    config = build_section(RSOConfig, settings(tmp_path, tiny_model_dir))
    result = run_rso(config, judge=build_judge({"type": "function", "function": f"{JUDGES}:distinct"}))
    out = tmp_path / "out"
    candidates = {r["prompt"]: r["completions"] for r in map(json.loads, (out / "candidates" / "samples.jsonl").read_text().splitlines())}
    rows = [json.loads(x) for x in (out / "rows" / "rows.jsonl").read_text().splitlines()]
    for prompt, texts in candidates.items():
        mine = [r for r in rows if r["prompt"] == prompt]
        distinct_texts = {t for t in texts if t.strip()}
        assert len(mine) == min(4, len(distinct_texts)) - 1
        for r in mine:
            assert r["chosen"] in texts and r["rejected"] in texts
            assert distinct(r["chosen"]) > distinct(r["rejected"]) and r["score_chosen"] == distinct(r["chosen"])
    assert result["rows"]["rows"] == len(rows) and Path(result["train"]["final"]).is_dir()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr("preftune.training.run.train_run", refuse)
    monkeypatch.setattr("preftune.feedback.sampling.load_for_sampling", refuse)
    again = run_rso(config, judge=build_judge({"type": "function", "function": f"{JUDGES}:distinct"}))
    assert again["rows"] == result["rows"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda v: v["rejection"].update(num_samples=9), r"M = 9 accepted of N = 8 candidates"),
    (lambda v: v["reward"].update(recipe="r.yaml"), r"exactly one of 'reward.recipe'"),
    (lambda v: v["train"].update(objective={"name": "kto"}), r"RSO trains on pairs; 'kto' does not"),
    (lambda v: v["rejection"].update(beta=0), r"'rejection.beta': must be > 0"),
])
def test_config_errors_name_the_key(tmp_path, tiny_model_dir, change, message):
    values = settings(tmp_path, tiny_model_dir)
    change(values)
    path = tmp_path / "rso.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=message):
        load_rso_config(path)


def test_rso_trains_its_reward_model_on_the_preference_data(tmp_path, tiny_model_dir):
    """reward.recipe: a `preftune reward` run on pairs (2 steps on the tiny backbone) becomes the scorer of the
    candidates; the rows' scores are that reward model's scores of the chosen and rejected completions."""
    from preftune.feedback.judges import build_judge as judge_of

    recipe = tmp_path / "reward.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir), "max_length": 32},
        "data": {"train_file": str(Path(__file__).resolve().parents[2] / "examples" / "pairs.jsonl")},
        "training": {"max_steps": 2, "batch_size": 4, "progress_bar": False, "eval_before_training": False}}))
    values = settings(tmp_path, tiny_model_dir)
    values["reward"] = {"recipe": str(recipe)}
    result = run_rso(build_section(RSOConfig, values))
    assert result["reward_model"] == str(tmp_path / "out" / "reward" / "final")
    scorer = judge_of({"type": "reward_model", "path": result["reward_model"]})
    row = json.loads((tmp_path / "out" / "rows" / "rows.jsonl").read_text().splitlines()[0])
    chosen, rejected = scorer.score([row["prompt"]] * 2, [row["chosen"], row["rejected"]])
    assert (chosen, rejected) == pytest.approx((row["score_chosen"], row["score_rejected"]), abs=1e-5)
    assert chosen > rejected
