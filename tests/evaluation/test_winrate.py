"""`preftune winrate`: win-rate arithmetic with ties and a seeded bootstrap, the sections computed from two
generations files, and the sequence KL(π‖π_ref) checked against log-probs computed from full logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from preftune.cli import main
from preftune.config import ConfigError
from preftune.evaluation.analysis.winrate import bootstrap_interval, win_rate
from preftune.evaluation.winrate import (
    KLConfig,
    LengthsConfig,
    WinrateConfig,
    evaluate_generations,
    load_winrate_config,
)
from preftune.feedback.judges import Judge
from preftune.testing import tiny_tokenizer

SETTINGS = {"num_samples": 2, "max_new_tokens": 5, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 0,
            "chat_template": False}


def length(completion):
    return len(completion)


def write_generations(path: Path, rows: list[tuple], model: str = "some-model") -> Path:
    path.write_text("".join(json.dumps({"index": i, "prompt": p, "completions": c, "model": model,
                                        "generation": SETTINGS}) + "\n" for i, (p, c) in enumerate(rows)))
    return path


def test_three_wins_one_tie_one_loss_is_point_seven():
    """(3 + 0.5) / 5 = 0.7, one prompt per verdict."""
    result = win_rate([[1.0], [1.0], [1.0], [0.5], [0.0]], samples=1000, seed=0)
    assert result.win_rate == pytest.approx(0.7)
    assert (result.wins, result.ties, result.losses, result.comparisons, result.prompts) == (3, 1, 1, 5, 5)
    assert result.ci_low <= 0.7 <= result.ci_high and result.ci_low < result.ci_high


def test_bootstrap_is_deterministic_for_a_seed_and_degenerate_for_constant_data():
    verdicts = [[1.0], [0.0], [1.0], [0.5], [1.0], [0.0], [1.0]]
    assert win_rate(verdicts, seed=3) == win_rate(verdicts, seed=3)
    assert bootstrap_interval([0.5, 0.5, 0.5], samples=200, seed=0) == (0.5, 0.5)
    low, high = bootstrap_interval([0.0, 1.0] * 50, samples=2000, confidence=0.95, seed=1)
    # the mean of 100 fair coin flips: standard error 0.05, so the interval is about 0.5 ± 0.1
    assert 0.38 < low < 0.45 and 0.55 < high < 0.62


def test_samples_of_a_prompt_are_averaged_and_missing_verdicts_left_out():
    """Prompt 1: (1 + 0) / 2 = 0.5; prompt 2: 1 (its None is not a verdict); prompt 3 has none:
    win rate (0.5 + 1) / 2 = 0.75 over 2 prompts."""
    result = win_rate([[1.0, 0.0], [1.0, None], [None]])
    assert result.win_rate == pytest.approx(0.75)
    assert (result.prompts, result.comparisons, result.no_result) == (2, 3, 2)


def _files(tmp_path: Path, model_name: str = "some-model") -> tuple[Path, Path]:
    model = write_generations(tmp_path / "model.jsonl", [
        ("A", ["xxx", "yy"]),       # vs x, yy: win (3 > 1), tie (2 = 2)
        ("B", ["z"]),               # vs zzzz: loss
        ("C", ["abcd", "ab"]),      # vs abc: win; the second sample has no partner
    ], model_name)
    baseline = write_generations(tmp_path / "baseline.jsonl", [("C", ["abc"]), ("A", ["x", "yy"]), ("B", ["zzzz"])])
    return model, baseline


def test_win_rate_reward_and_lengths_from_two_generations_files(tmp_path):
    """Per prompt: A (1 + 0.5) / 2 = 0.75, B 0, C 1 -> (0.75 + 0 + 1) / 3 = 0.583333. Model rewards (lengths)
    3, 2, 1, 4, 2: mean 2.4; baseline 3, 1, 2, 4: mean 2.5. Characters of the model's completions sorted
    1, 2, 2, 3, 4: median 2, p90 at position 0.9 * 4 = 3.6 -> 3 + 0.6 * (4 - 3) = 3.6."""
    model, baseline = _files(tmp_path)
    config = WinrateConfig(model_file=str(model), baseline_file=str(baseline), progress_bar=False,
                           judge={"type": "function", "function": f"{__name__}:length"},
                           output_file=str(tmp_path / "out" / "winrate.json"))
    report = evaluate_generations(config)
    w = report["win_rate"]
    assert w["win_rate"] == pytest.approx(1.75 / 3)
    assert (w["wins"], w["ties"], w["losses"], w["comparisons"], w["prompts"]) == (2, 1, 1, 4, 3)
    assert report["reward"]["model"]["mean"] == pytest.approx(2.4)
    assert report["reward"]["baseline"]["mean"] == pytest.approx(2.5)
    chars = report["lengths"]["model"]
    assert (chars["chars/mean"], chars["chars/median"], chars["chars/p90"]) == pytest.approx((2.4, 2.0, 3.6))
    assert "tokens/mean" not in chars  # "some-model" has no tokenizer: characters only
    assert report["judge"] == {"judged": 9, "no_result": 0}  # every completion scored once
    assert json.loads((tmp_path / "out" / "winrate.json").read_text()) == report


class Favours(Judge):
    """A pairwise judge that gives the first completion a fixed probability of being better."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def compare(self, prompts, firsts, seconds):
        return self.tally([self.p] * len(firsts))


def test_pairwise_judge_verdicts_and_no_reward_section(tmp_path):
    model, baseline = _files(tmp_path)
    config = WinrateConfig(model_file=str(model), baseline_file=str(baseline), progress_bar=False,
                           output_file=str(tmp_path / "w.json"), lengths=LengthsConfig(enabled=False))
    report = evaluate_generations(config, Favours(0.75))
    assert report["win_rate"]["win_rate"] == pytest.approx(0.75) and report["win_rate"]["wins"] == 4
    assert "reward" not in report and "lengths" not in report and "kl" not in report


def test_files_with_other_prompts_are_an_error(tmp_path):
    model = write_generations(tmp_path / "m.jsonl", [("A", ["x"]), ("B", ["y"])])
    baseline = write_generations(tmp_path / "b.jsonl", [("A", ["x"]), ("Q", ["y"])])
    config = WinrateConfig(model_file=str(model), baseline_file=str(baseline), progress_bar=False,
                           output_file=str(tmp_path / "w.json"))
    with pytest.raises(ValueError, match="must hold the same prompts"):
        evaluate_generations(config, Favours(1.0))


def _full_logits_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Σ log p(completion token | everything before it), from the model's full vocabulary logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[len(prompt_ids) + k - 1, t]) for k, t in enumerate(completion_ids))


def test_kl_is_zero_against_itself_and_matches_a_full_logits_computation(tmp_path, tiny_model_dir, other_model_dir):
    from transformers import AutoModelForCausalLM

    rows = [("The movie was", [" great fun", " a long and winding story about nothing at all"]),
            ("I think", [" bad", ""])]
    model_file = write_generations(tmp_path / "g.jsonl", rows, str(tiny_model_dir))
    base = {"model_file": str(model_file), "progress_bar": False, "output_file": str(tmp_path / "w.json")}
    same = evaluate_generations(WinrateConfig(**base, kl=KLConfig(reference=str(tiny_model_dir))))
    assert same["kl"]["mean"] == 0.0 and same["kl"]["samples"] == 4
    report = evaluate_generations(WinrateConfig(**base, kl=KLConfig(reference=str(other_model_dir), batch_size=3)))
    tokenizer = tiny_tokenizer()
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(other_model_dir).eval()
    ratios = []
    for prompt, completions in rows:
        for completion in completions:
            prompt_ids = tokenizer(prompt)["input_ids"]  # BOS + prompt, as generate encodes text prompts
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            if len(completion_ids) < SETTINGS["max_new_tokens"]:  # generation stopped at EOS
                completion_ids.append(tokenizer.eos_token_id)
            ratios.append(_full_logits_logps(policy, prompt_ids, completion_ids)
                          - _full_logits_logps(reference, prompt_ids, completion_ids))
    assert report["kl"]["mean"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-4)
    assert report["kl"]["samples_from_policy"] is True
    lengths = report["lengths"]["model"]  # the policy's tokenizer counts tokens
    counts = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, cs in rows for c in cs]
    assert lengths["tokens/mean"] == pytest.approx(sum(counts) / 4)


def test_winrate_command_and_config_errors(tmp_path):
    model, baseline = _files(tmp_path)
    recipe = tmp_path / "winrate.yaml"
    recipe.write_text("# test\n# Run:  preftune winrate winrate.yaml\n" + yaml.safe_dump({
        "model_file": "model.jsonl", "baseline_file": "baseline.jsonl", "output_file": str(tmp_path / "o.json"),
        "judge": {"type": "function", "function": f"{__name__}:length"}, "progress_bar": False}))
    for command in ("winrate", "eval"):  # `preftune eval` given a generations recipe runs the same evaluation
        (tmp_path / "o.json").unlink(missing_ok=True)
        assert main([command, str(recipe)]) == 0  # relative files resolve beside the recipe
        assert json.loads((tmp_path / "o.json").read_text())["win_rate"]["win_rate"] == pytest.approx(1.75 / 3)
    with pytest.raises(ConfigError, match="a win rate needs a judge"):
        load_winrate_config(recipe, ["judge={}"])
    with pytest.raises(ConfigError, match="'bootstrap.samples'"):
        load_winrate_config(recipe, ["bootstrap.samples=0"])


def not_a_score(completion):
    return "n/a"


def test_a_judge_with_no_usable_verdict_fails_winrate(tmp_path, capsys):
    """Both files judged by a function that never returns a number: 4 completions, all unparsable: exit 1."""
    model = write_generations(tmp_path / "model.jsonl", [("Q:", ["aa", "b"])])
    baseline = write_generations(tmp_path / "base.jsonl", [("Q:", ["c", "dd"])])
    recipe = tmp_path / "winrate.yaml"
    recipe.write_text(yaml.safe_dump({"model_file": str(model), "baseline_file": str(baseline),
                                      "output_file": str(tmp_path / "report.json"), "progress_bar": False,
                                      "judge": {"type": "function", "function": f"{__name__}:not_a_score"}}))
    assert main(["winrate", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "no usable result for any of the 4 items" in err and "first unparsable: \"'n/a'\"" in err
    assert not (tmp_path / "report.json").exists()
