"""``preftune frontier``: prompts, Best-of-N arithmetic, the whole experiment on the tiny model (a function judge
stands in for the sentiment reward model, so every reward can be recomputed here), resume and config errors."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from preftune.cli import main
from preftune.config import ConfigError, build_section
from preftune.experiments.frontier.config import FrontierConfig, FrontierPromptsConfig, load_frontier_config
from preftune.experiments.frontier.run import best_of_n, make_prompts, run_frontier
from preftune.experiments.snippets import read_snippets
from preftune.feedback.judges import build_judge

ROOT = Path(__file__).resolve().parents[2]


def count_e(completion):
    """The stand-in reward: how many letters e the continuation has."""
    return float(completion.count("e"))


def test_prompts_are_disjoint_prefixes_of_snippets_within_the_word_bounds():
    config = FrontierPromptsConfig(train=50, eval=20, min_words=2, max_words=5, seed=3)
    train, held_out = make_prompts(config)
    assert (len(train), len(held_out)) == (50, 20)
    assert not set(train) & set(held_out) and len(set(train)) == 50
    texts = [r.text.split() for r in read_snippets()]
    for prompt in train + held_out:
        words = prompt.split()
        assert 2 <= len(words) <= 5
        assert any(t[: len(words)] == words and len(t) > len(words) for t in texts), prompt
    assert make_prompts(config) == (train, held_out)  # same seed, same prompts
    assert make_prompts(FrontierPromptsConfig(train=50, eval=20, seed=4)) != (train, held_out)


def test_too_few_snippets_is_an_error(tmp_path):
    tsv = tmp_path / "rated.tsv"
    tsv.write_text("id\tsentiment\ttext\n1\t2.0\tA fine film indeed\n2\t-1.0\tDull\n")
    with pytest.raises(ValueError, match=r"rated.tsv: only 1 distinct prefixes, 3 wanted"):
        make_prompts(FrontierPromptsConfig(file=str(tsv), train=2, eval=1))


def test_best_of_n_by_hand():
    """Two prompts, four samples each. n=2 cuts each into groups [1,3] [2,5] and [0,0] [4,1]: bests 3, 5, 0, 4,
    mean 3.0. n=4: bests 5 and 4, mean 4.5. n=1: the plain mean 16/8 = 2.0. KL = log n - (n-1)/n: 0,
    log 2 - 1/2 = 0.193147, log 4 - 3/4 = 0.636294. The chosen samples' lengths: n=2 -> samples 1, 3 of the
    first prompt (10, 30 tokens) and 0, 2 of the second (the first of a tie: 5; then 7): mean 13."""
    scores = [[1.0, 3.0, 2.0, 5.0], [0.0, 0.0, 4.0, 1.0]]
    lengths = [[20, 10, 40, 30], [5, 6, 7, 8]]
    one, two, four = (best_of_n(scores, n, lengths) for n in (1, 2, 4))
    assert (one["reward"], two["reward"], four["reward"]) == (2.0, 3.0, 4.5)
    assert (one["groups"], two["groups"], four["groups"]) == (8, 4, 2)
    assert one["kl"] == 0.0
    assert two["kl"] == pytest.approx(0.193147, abs=1e-6) and four["kl"] == pytest.approx(0.636294, abs=1e-6)
    assert two["mean_tokens"] == 13.0
    assert two["reward_stderr"] == pytest.approx(statistics.stdev([3, 5, 0, 4]) / 2)
    assert best_of_n([[1.0, 2.0, 3.0]], 2)["groups"] == 1  # a remainder smaller than n is left out
    # with a sign threshold of 2.5, three of the four n=2 bests (3, 5, 4; not 0) read as positive
    two = best_of_n(scores, 2, threshold=2.5)
    assert two["positive"] == 0.75 and two["positive_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert "positive" not in best_of_n(scores, 2)


def _config(tmp_path: Path, model: Path, **extra) -> FrontierConfig:
    values = {
        "output_dir": str(tmp_path / "out"), "policy": {"name_or_path": str(model)},
        "prompts": {"train": 10, "eval": 4, "max_words": 4}, "sampling": {"max_new_tokens": 5, "batch_size": 8},
        "pairs": {"num_samples": 3}, "evaluation": {"num_samples": 2, "best_of": [1, 2, 4]},
        "data": {"max_length": 48, "max_prompt_length": 24},
        "training": {"batch_size": 4, "learning_rate": 1e-3, "max_steps": 2, "save_steps": None, "tensorboard": False,
                     "eval_before_training": False},
        "methods": [{"name": "dpo_b0.1", "objective": {"name": "dpo", "beta": 0.1}},
                    {"name": "preferred_ft", "family": "sft", "objective": {"name": "sft"}}],
        "progress_bar": False, **extra,
    }
    return build_section(FrontierConfig, values)


def _judge():
    return build_judge({"type": "function", "function": f"{__name__}:count_e"})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_experiment_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    config = _config(tmp_path, tiny_model_dir, report_dir=str(tmp_path / "report"))
    report = run_frontier(config, judge=_judge())
    out = tmp_path / "out"
    points = {p["name"]: p for p in report["points"]}
    assert list(points) == ["best_of_1", "best_of_2", "best_of_4", "dpo_b0.1", "preferred_ft"]

    # the pairs: best vs worst of each prompt's 3 samples under the judge
    samples = _rows(out / "pairs" / "samples.jsonl")
    pairs = _rows(out / "pairs" / "pairs.jsonl")
    assert len(samples) == 10 and report["pairs"]["rows_written"] == len(pairs) > 0
    for pair in pairs:
        assert count_e(pair["chosen"]) > count_e(pair["rejected"])

    # Best-of-N points recomputed from the base samples: 4 per held-out prompt
    base = [[count_e(c) for c in row["completions"]] for row in _rows(out / "best_of_n" / "samples.jsonl")]
    assert [len(b) for b in base] == [4] * 4
    assert points["best_of_1"]["reward"] == pytest.approx(statistics.fmean(s for b in base for s in b))
    assert points["best_of_4"]["reward"] == pytest.approx(statistics.fmean(max(b) for b in base))
    assert points["best_of_2"]["kl"] == pytest.approx(math.log(2) - 0.5)

    # a trained point: its reward is the judge's mean over its own held-out samples; KL and lengths are there
    for name in ("dpo_b0.1", "preferred_ft"):
        rows = _rows(out / "methods" / name / "samples.jsonl")
        assert [r["prompt"] for r in rows] == [json.loads(x)["prompt"] for x in
                                               (out / "prompts" / "eval.jsonl").read_text().splitlines()]
        assert points[name]["reward"] == pytest.approx(statistics.fmean(count_e(c) for r in rows for c in r["completions"]))
        assert math.isfinite(points[name]["kl"]) and points[name]["kl_stderr"] > 0
        assert rows[0]["model"].endswith(f"{name}/final")
    assert points["preferred_ft"]["family"] == "sft" and points["dpo_b0.1"]["params"] == {"beta": 0.1}

    # the outputs, also copied to report_dir
    for folder in (out, tmp_path / "report"):
        assert (folder / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((folder / "frontier.json").read_text())["points"] == report["points"]
        md = (folder / "frontier.md").read_text()
        assert "| dpo_b0.1 (DPO) | beta=0.1 |" in md and "| best of 4 (Best-of-N) | n=4 | 0.636 |" in md

    # a rerun trains and samples nothing and gives the same numbers
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage was run again")

    monkeypatch.setattr("preftune.training.run.train_run", refuse)
    monkeypatch.setattr("preftune.feedback.sampling.load_for_sampling", refuse)
    assert run_frontier(config, judge=_judge())["points"] == report["points"]

    # the same name with other settings is not silently reused
    changed = _config(tmp_path, tiny_model_dir, methods=[{"name": "dpo_b0.1", "objective": {"name": "dpo", "beta": 0.5}}])
    with pytest.raises(ValueError, match=r"dpo_b0.1/point.json was produced with other settings"):
        run_frontier(changed, judge=_judge())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"methods": [{"name": "a", "objective": {"name": "dpo"}}, {"name": "a", "objective": {"name": "ipo"}}]},
         r"'methods\[1\].name': 'a' is used twice"),
        ({"methods": [{"name": "a", "objective": {}}]}, r"'methods\[0\].objective': needs at least a name"),
        ({"methods": [{"name": "x/y", "objective": {"name": "dpo"}}]}, r"'methods\[0\].name': a folder name"),
        ({"methods": [{"name": "a", "objective": {"name": "dpo", "gamma": 1}}]},
         r"methods\[0\] \(a\): .*objective 'dpo' does not take parameter\(s\) gamma"),
        ({"methods": [{"name": "a", "objective": {"name": "dpo"}, "training": {"batch_sise": 2}}]},
         r"methods\[0\] \(a\): unknown config key 'training.batch_sise'"),
        ({"methods": [{"name": "a", "objectve": {"name": "dpo"}}]}, r"unknown config key 'methods\[0\].objectve'"),
        ({"evaluation": {"best_of": [0]}}, r"'evaluation.best_of': every n must be >= 1"),
        ({"pairs": {"num_samples": 1}}, r"'pairs.num_samples': a pair needs 2 samples"),
        ({"prompts": {"min_words": 5, "max_words": 3}}, r"'prompts.max_words': must be >= prompts.min_words"),
    ],
)
def test_config_errors_name_the_key(tmp_path, extra, message):
    path = tmp_path / "frontier.yaml"
    path.write_text(yaml.safe_dump({"methods": [{"name": "dpo", "objective": {"name": "dpo"}}], **extra}))
    with pytest.raises(ConfigError, match=message):
        load_frontier_config(path)
    assert main(["frontier", str(path)]) == 2


def test_the_presets_load_and_their_reward_recipe_is_found():
    for name in ("frontier", "frontier_gpu"):
        config = load_frontier_config(ROOT / "configs" / f"{name}.yaml")
        assert Path(config.reward.recipe).is_file()
        families = {m.family or m.objective["name"] for m in config.methods}
        assert {"dpo", "ipo", "simpo", "sft", "unlikelihood"} <= families
        assert 1 in config.evaluation.best_of


def test_reward_stage_trains_once_and_refuses_a_changed_recipe(tmp_path, tiny_model_dir, monkeypatch):
    from preftune.experiments.frontier.run import reward_stage

    recipe = tmp_path / "reward.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir), "max_length": 32},
        "data": {"train_file": str(ROOT / "examples" / "pairs.jsonl")},
        "training": {"max_steps": 2, "batch_size": 4, "progress_bar": False, "eval_before_training": False}}))
    config = _config(tmp_path, tiny_model_dir, reward={"recipe": str(recipe)})
    path, summary = reward_stage(config, tmp_path / "out")
    assert Path(path) == tmp_path / "out" / "reward" / "final" and (Path(path) / "reward_model.json").is_file()
    assert summary["final_dir"] == path

    def refuse(*args, **kwargs):
        raise AssertionError("the reward model was trained again")

    monkeypatch.setattr("preftune.reward.train.train_reward", refuse)
    assert reward_stage(config, tmp_path / "out") == (path, summary)
    changed = _config(tmp_path, tiny_model_dir, reward={"recipe": str(recipe), "overrides": ["training.max_steps=3"]})
    with pytest.raises(ValueError, match=r"reward holds a reward model trained from another recipe"):
        reward_stage(changed, tmp_path / "out")
