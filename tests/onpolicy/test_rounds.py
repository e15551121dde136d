"""``preftune iterate`` end to end on the tiny model: every method's rows, the reference each round trains
against, resume after a kill at each stage (sampling, judging, training, evaluation) reproducing the
uninterrupted run, and a changed recipe under the same output folder refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from preftune.cli import main
from preftune.config import ConfigError, build_section
from preftune.feedback.judges import build_judge
from preftune.onpolicy.rounds import run_rounds
from preftune.onpolicy.rounds_config import IterateConfig, load_iterate_config

JUDGES = str(Path(__file__).with_name("judges.py"))
PROMPTS = ["The movie was", "I think this film", "A story about", "Honestly the plot", "The actors were"]


def count_e(text: str) -> float:
    return float(text.count("e"))


def settings(tmp_path: Path, model: Path, method: str = "iterative_dpo", **extra) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    values = {
        "output_dir": str(tmp_path / "out"), "method": method, "rounds": 2, "prompts_per_round": 4,
        "policy": {"name_or_path": str(model)}, "prompts": {"file": str(prompts), "chat_template": False},
        "sampling": {"num_samples": 3, "max_new_tokens": 6, "batch_size": 2},
        "judge": {"type": "function", "function": f"{JUDGES}:count_e"},
        "labels": {"chunk_size": 2},
        "train": {"objective": {"name": "sppo" if method == "sppo" else "dpo", "beta": 0.1},
                  "data": {"max_length": 32, "max_prompt_length": 16},
                  "training": {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "save_steps": 1, "logging_steps": 1,
                               "tensorboard": False, "eval_before_training": False}},
        "evaluation": {"prompts_file": str(prompts), "num_samples": 2},
        "progress_bar": False,
    }
    for key, value in extra.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    return values


def run(values: dict):
    return run_rounds(build_section(IterateConfig, values), judge=build_judge(values["judge"]))


def rows(out: Path, t: int) -> list[dict]:
    return [json.loads(x) for x in (out / f"round-{t}" / "rows" / "rows.jsonl").read_text().splitlines()]


def samples(out: Path, t: int) -> list[dict]:
    return [json.loads(x) for x in (out / f"round-{t}" / "samples" / "samples.jsonl").read_text().splitlines()]


def summary(report: dict) -> list:
    return [(r["round"], r.get("rows", {}).get("rows"), (r.get("train") or {}).get("loss"),
             r["evaluation"]["reward"], r["evaluation"]["kl"]) for r in report["rounds"]]


def test_iterative_dpo_two_rounds_resumes_after_a_kill_at_every_stage(tmp_path, tiny_model_dir, monkeypatch):
    """Round t samples from round t-1's final model, pairs the most-e and least-e samples, and trains against
    π_{t-1}. A run killed once in each stage and rerun each time ends with the same rows, losses, rewards and
    KLs as the uninterrupted run."""
    whole = run(settings(tmp_path / "a", tiny_model_dir))
    out = tmp_path / "a" / "out"
    assert [r["round"] for r in whole["rounds"]] == [0, 1, 2]
    assert samples(out, 2)[0]["model"] == str(out / "round-1" / "train" / "final")
    assert [s["prompt"] for s in samples(out, 2)] == [PROMPTS[4], PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # wraps
    for t in (1, 2):
        for row in rows(out, t):
            assert count_e(row["chosen"]) > count_e(row["rejected"])
        config = yaml.safe_load((out / f"round-{t}" / "train" / "config.yaml").read_text())
        assert config["reference"]["name_or_path"] is None  # a frozen copy of this round's starting policy
    assert whole["rounds"][0]["evaluation"]["kl"] == 0.0
    assert whole["rounds"][2]["evaluation"]["reward"] == pytest.approx(sum(
        count_e(c) for r in [json.loads(x) for x in (out / "round-2" / "evaluation" / "samples" / "samples.jsonl")
                             .read_text().splitlines()] for c in r["completions"]) / 10)

    values = settings(tmp_path / "b", tiny_model_dir)
    kills = iter(["sampling", "judging", "training", "evaluation"])
    armed = {"what": next(kills), "calls": 0}

    def killer(what, original):
        def wrapped(*args, **kwargs):
            if armed["what"] == what:
                armed["calls"] += 1
                if armed["calls"] == 2:  # let one call through, die on the second
                    raise RuntimeError(f"killed while {what}")
            return original(*args, **kwargs)
        return wrapped

    from preftune.evaluation import winrate
    from preftune.feedback import sampling
    from preftune.feedback.judges import function
    from preftune.training import preference

    monkeypatch.setattr(sampling.HFSampler, "stream", killer("sampling", sampling.HFSampler.stream))
    monkeypatch.setattr(function.FunctionJudge, "score", killer("judging", function.FunctionJudge.score))
    monkeypatch.setattr(preference.PreferenceTask, "loss", killer("training", preference.PreferenceTask.loss))
    monkeypatch.setattr(winrate, "evaluate_generations", killer("evaluation", winrate.evaluate_generations))
    died = []
    while True:
        try:
            report = run(values)
            break
        except RuntimeError as exc:
            died.append(str(exc))
            armed.update(what=next(kills, None), calls=0)
    assert died == ["killed while sampling", "killed while judging", "killed while training",
                    "killed while evaluation"]
    assert summary(report) == summary(whole)
    for t in (1, 2):
        assert rows(tmp_path / "b" / "out", t) == rows(out, t)


def test_a_changed_recipe_is_refused_and_more_rounds_continue(tmp_path, tiny_model_dir, monkeypatch):
    values = settings(tmp_path, tiny_model_dir, rounds=1, evaluation={"prompts_file": None})
    first = run(values)
    with pytest.raises(ValueError, match=r"round-1/rows was produced with other settings \(changed: labels.min_margin\)"):
        run(settings(tmp_path, tiny_model_dir, rounds=1, evaluation={"prompts_file": None}, labels={"min_margin": 0.5}))

    def refuse(*args, **kwargs):
        raise AssertionError("a finished round was trained again")

    more = settings(tmp_path, tiny_model_dir, rounds=2, evaluation={"prompts_file": None})
    from preftune.training import run as run_module

    original = run_module.train_run
    calls = []
    monkeypatch.setattr(run_module, "train_run", lambda config, objective, command="train": calls.append(
        config.training.output_dir) or original(config, objective, command))
    report = run(more)
    assert calls == [str(tmp_path / "out" / "round-2" / "train")]
    assert report["rounds"][1]["rows"] == first["rounds"][1]["rows"]


@pytest.mark.parametrize("method", ["dno", "sppo"])
def test_dno_and_sppo_rows_and_reference(tmp_path, tiny_model_dir, method):
    """DNO: the teacher's completion (all e's) joins every prompt's samples and wins; pairs need a win-rate margin.
    SPPO: scored rows, P̂ = the sample's mean win against the other two samples (blank ones included as
    opponents, never as rows), winner then loser."""
    extra = {}
    if method == "dno":
        teacher = tmp_path / "teacher.jsonl"
        teacher.write_text("".join(json.dumps({"prompt": p, "completion": " eeeeeeeeeeee"}) + "\n" for p in PROMPTS))
        extra = {"labels": {"teacher_file": str(teacher), "min_margin": 0.5}}
    report = run(settings(tmp_path, tiny_model_dir, method, rounds=1, evaluation={"prompts_file": None}, **extra))
    out = tmp_path / "out"
    written = rows(out, 1)
    if method == "dno":
        assert written and all(r["chosen"] == " eeeeeeeeeeee" for r in written)
        assert all(r["score_chosen"] - r["score_rejected"] >= 0.5 for r in written)
        assert report["rounds"][1]["rows"]["teacher_chosen"] == len(written)
    else:
        for gen in samples(out, 1):
            e = [count_e(c) for c in gen["completions"]]
            rates = [sum((a > b) + 0.5 * (a == b) for j, b in enumerate(e) if j != i) / 2 for i, a in enumerate(e)]
            mine = [r for r in written if r["prompt"] == gen["prompt"]]
            kept = [i for i, c in enumerate(gen["completions"]) if c.strip()]  # a blank sample is no row
            best = max(kept, key=lambda i: (rates[i], -i))
            worst = min(kept, key=lambda i: (rates[i], i))
            expected = [(gen["completions"][best], rates[best])] + (
                [(gen["completions"][worst], rates[worst])] if best != worst else [])
            assert [(r["completion"], r["score"]) for r in mine] == expected


@pytest.mark.parametrize(("extra", "message"), [
    ({"method": "sppo", "reference": "initial"}, r"'reference': sppo regresses towards"),
    ({"train": {"objective": {"name": "sppo"}}}, r"iterative_dpo writes pairs rows; objective 'sppo' trains on scored"),
    ({"labels": {"teacher_file": "t.jsonl"}}, r"teacher's completions join the samples in dno only"),
    ({"sampling": {"temperature": 0}}, r"on-policy samples need temperature > 0"),
    ({"train": {"data": {"train_file": "x.jsonl"}}}, r"'train.data.train_file' is set by the driver"),
    ({"judge": {"type": "functon"}}, r"'judge.type': expected one of"),
    ({"train": {"training": {"batch_sise": 2}}}, r"section 'train': unknown config key 'training.batch_sise'"),
])
def test_config_errors_name_the_key(tmp_path, tiny_model_dir, extra, message):
    path = tmp_path / "iterate.yaml"
    values = settings(tmp_path, tiny_model_dir)
    for key, value in extra.items():
        values[key] = value
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=message):
        load_iterate_config(path)
    assert main(["iterate", str(path)]) == 2
