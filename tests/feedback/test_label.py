"""``preftune label``: generations + a judge -> pairs, ranked lists, unpaired labels. The judge here scores a
completion by its length, so the expected best / worst / labels are known by counting characters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from preftune.cli import main
from preftune.config import DataConfig
from preftune.data import DataValidationError, load_examples
from preftune.feedback.judges import Judge, judge_config
from preftune.feedback.label import LabelConfig, label, load_label_config

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "Review the film."}]


def length(completion):
    return None if "???" in completion else len(completion)


def write_generations(path: Path, rows: list[tuple]) -> Path:
    path.write_text("".join(json.dumps({"index": i, "prompt": p, "completions": c}) + "\n" for i, (p, c) in enumerate(rows)))
    return path


def run(tmp_path: Path, rows: list[tuple], judge: Judge | None = None, **values) -> tuple[list[dict], dict]:
    source = write_generations(tmp_path / "generations.jsonl", rows)
    out = tmp_path / "labelled" / "out.jsonl"
    config = LabelConfig(input_file=str(source), output_file=str(out), progress_bar=False, chunk_size=2,
                         judge={"type": "function", "function": f"{__name__}:length"}, **values)
    summary = label(config, judge)
    assert json.loads((out.parent / "out.summary.json").read_text()) == summary
    return [json.loads(line) for line in out.read_text().splitlines()], summary


def test_best_vs_worst_text_and_conversational_and_they_load_for_training(tmp_path):
    rows, summary = run(tmp_path, [
        ("Q1:", [" ab", " abcd", " a"]),              # lengths 3, 5, 2
        (CHAT, ["fine", "a bit longer", "mid one"]),  # lengths 4, 12, 7
        ("Q3:", [" same", " same", " "]),             # a duplicate and a blank: one candidate left
        ("Q4:", ["xx", "yy"]),                        # all tied
    ])
    assert rows == [
        {"prompt": "Q1:", "chosen": " abcd", "rejected": " a", "score_chosen": 5.0, "score_rejected": 2.0},
        {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "a bit longer"}],
         "rejected": [{"role": "assistant", "content": "fine"}], "score_chosen": 12.0, "score_rejected": 4.0},
    ]
    assert summary["rows_written"] == 2 and summary["prompts"] == 4 and summary["completions"] == 11
    assert summary["duplicate_completions"] == 1 and summary["empty_completions"] == 1
    assert summary["prompts_too_few_scored"] == 1 and summary["all_tied_prompts"] == 1
    assert summary["judge"] == {"judged": 9, "no_result": 0}  # blanks and repeats are not judged
    text_pairs = tmp_path / "text.jsonl"
    text_pairs.write_text(json.dumps(rows[0]) + "\n")
    chat_pairs = tmp_path / "chat.jsonl"
    chat_pairs.write_text(json.dumps(rows[1]) + "\n")
    for path in (text_pairs, chat_pairs):
        splits = load_examples(DataConfig(train_file=str(path)), "pairs")
        assert len(splits.train) == 1
    assert load_examples(DataConfig(train_file=str(text_pairs)), "pairs").train[0].chosen == " abcd"


def test_all_pairs_skips_and_counts_tied_pairs(tmp_path):
    rows, summary = run(tmp_path, [("Q:", ["aa", "bb", "c", "dddd"])], format="all_pairs")  # 2, 2, 1, 4
    got = {(r["chosen"], r["rejected"]) for r in rows}
    # 6 pairs minus the tie aa/bb
    assert got == {("aa", "c"), ("bb", "c"), ("dddd", "aa"), ("dddd", "bb"), ("dddd", "c")}
    assert summary["tied_pairs"] == 1 and summary["all_tied_prompts"] == 0
    assert len(load_examples(DataConfig(train_file=str(tmp_path / "labelled" / "out.jsonl")), "pairs").train) == 5


def test_min_margin_makes_close_scores_ties(tmp_path):
    rows, summary = run(tmp_path, [("Q:", ["aaa", "bb", "c"])], format="all_pairs", min_margin=1.0)  # 3, 2, 1
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("aaa", "c")]  # only the gap of 2 > 1
    assert summary["tied_pairs"] == 2


def test_best_vs_random_draws_only_below_the_best_and_is_seeded(tmp_path):
    data = [("Q:", ["dddd", "a", "bb", "ccc"]), ("R:", ["dd", "ee", "a"])]
    first, _ = run(tmp_path, data, format="best_vs_random", seed=3)
    second, _ = run(tmp_path, data, format="best_vs_random", seed=3)
    assert first == second
    assert first[0]["chosen"] == "dddd" and first[0]["rejected"] in {"a", "bb", "ccc"}
    assert (first[1]["chosen"], first[1]["rejected"]) == ("dd", "a")  # ee ties with the best: never drawn
    drawn = {run(tmp_path, data[:1], format="best_vs_random", seed=s)[0][0]["rejected"] for s in range(12)}
    assert len(drawn) > 1  # the draw depends on the seed


def test_ranked_lists_best_first(tmp_path):
    rows, summary = run(tmp_path, [("Q:", ["bb", "dddd", "a", "ccc"]), (CHAT, ["xx", "yyy"]), ("T:", ["x", "y"])],
                        format="ranked")
    assert rows[0] == {"prompt": "Q:", "completions": ["dddd", "ccc", "bb", "a"], "scores": [4.0, 3.0, 2.0, 1.0]}
    assert rows[1]["completions"] == [[{"role": "assistant", "content": "yyy"}], [{"role": "assistant", "content": "xx"}]]
    assert len(rows) == 2 and summary["all_tied_prompts"] == 1
    for row in rows:  # a training file holds text or conversations, not both: one file each
        out = tmp_path / "one.jsonl"
        out.write_text(json.dumps(row) + "\n")
        assert load_examples(DataConfig(train_file=str(out)), "ranked").train[0].slots == row["completions"]


def test_unpaired_labels_by_median_or_threshold(tmp_path):
    # lengths 1, 2, 3, 4: median 2.5 -> F, F, T, T; lengths 1, 2, 3: median 2 -> the middle one is a tie
    rows, summary = run(tmp_path, [("Q:", ["a", "bb", "ccc", "dddd"]), ("R:", ["a", "bb", "ccc"])], format="unpaired")
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("Q:", "a", False), ("Q:", "bb", False), ("Q:", "ccc", True), ("Q:", "dddd", True), ("R:", "a", False), ("R:", "ccc", True)]
    assert summary["tied_completions"] == 1
    assert len(load_examples(DataConfig(train_file=str(tmp_path / "labelled" / "out.jsonl")), "unpaired").train) == 6
    rows, summary = run(tmp_path, [("Q:", ["a", "bb", "ccc"]), (CHAT, ["dddd"])], format="unpaired", threshold=2.0)
    assert [r["label"] for r in rows] == [False, True, True] and summary["tied_completions"] == 1
    assert rows[2]["completion"] == [{"role": "assistant", "content": "dddd"}]


def test_unparsable_judgements_are_counted_not_dropped_silently(tmp_path):
    rows, summary = run(tmp_path, [("Q:", ["aa", "b???", "c"]), ("R:", ["x???", "yy"])])
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("aa", "c")]
    assert summary["unscored_completions"] == 2 and summary["prompts_too_few_scored"] == 1
    assert summary["judge"] == {"judged": 5, "no_result": 2, "unparsable": 2}


def not_a_score(completion):
    return "n/a"


def test_a_judge_with_nothing_usable_fails_the_command_with_counts_and_an_example(tmp_path, capsys):
    """Every judgement unparsable: no rows, exit code 1, and the message says how many and shows one. Ties
    everywhere (a usable judge, nothing to pair): exit code 2 naming the counts; nothing written either way."""
    source = write_generations(tmp_path / "generations.jsonl", [("Q:", ["aa", "b"]), ("R:", ["cc", "d"])])
    path = tmp_path / "label.yaml"
    out = tmp_path / "pairs.jsonl"
    path.write_text(yaml.safe_dump({"input_file": str(source), "output_file": str(out), "progress_bar": False,
                                    "judge": {"type": "function", "function": f"{__name__}:not_a_score"}}))
    assert main(["label", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no usable result for any of the 4 items" in err and "4 unparsable" in err and "first unparsable: \"'n/a'\"" in err
    assert not out.exists()
    tied = write_generations(tmp_path / "tied.jsonl", [("Q:", ["aa", "bb"])])
    assert main(["label", str(path), f"input_file={tied}", f"judge.function={__name__}:length"]) == 2
    assert "labelling gave no best_vs_worst rows to write (all_tied_prompts: 1" in capsys.readouterr().err
    assert not out.exists()


class LongerWins(Judge):
    """A pairwise judge: P(first better) = 1 if longer, 0 if shorter, 0.5 if as long."""

    def compare(self, prompts, firsts, seconds):
        return self.tally([1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(firsts, seconds, strict=True)])


def test_a_pairwise_judge_ranks_by_mean_win_probability(tmp_path):
    """["ccc", "a", "bb", "dd"]: ccc beats all three -> 1; a loses all -> 0; bb beats a, ties dd, loses to
    ccc -> (1 + 0.5 + 0) / 3 = 0.5; dd likewise 0.5. Six comparisons for four completions."""
    judge = LongerWins()
    rows, summary = run(tmp_path, [("Q:", ["ccc", "a", "bb", "dd"])], judge, format="ranked")
    assert rows == [{"prompt": "Q:", "completions": ["ccc", "bb", "dd", "a"], "scores": [1.0, 0.5, 0.5, 0.0]}]
    assert summary["judge"] == {"judged": 6, "no_result": 0}


def test_cli_label_prints_the_summary_and_the_recipe_checks(tmp_path, capsys):
    recipe = load_label_config(ROOT / "configs" / "label.yaml")
    cls, _ = judge_config(recipe.judge)  # the recipe's judge section is valid (building it loads a model)
    assert cls.__name__ == "ChatModelJudge" and recipe.output_file.startswith("runs/")
    source = write_generations(tmp_path / "generations.jsonl", [("Q:", ["aa", "b", "ccc"])])
    path = tmp_path / "label.yaml"
    path.write_text(yaml.safe_dump({"input_file": str(source), "output_file": str(tmp_path / "pairs.jsonl"),
                                    "progress_bar": False, "judge": {"type": "function", "function": f"{__name__}:length"}}))
    assert main(["label", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 rows (best_vs_worst) from 1 prompts" in out and "tied_pairs" in out and "pairs.summary.json" in out
    assert json.loads((tmp_path / "pairs.jsonl").read_text())["chosen"] == "ccc"
    assert main(["label", str(path), "format=best_vs_wrst"]) == 2
    assert "'format': expected one of 'best_vs_worst'" in capsys.readouterr().err
    assert main(["label", str(path), "judge.type=functon"]) == 2
    assert "did you mean 'function'?" in capsys.readouterr().err


def test_bad_generation_rows_name_file_and_line(tmp_path):
    source = tmp_path / "generations.jsonl"
    source.write_text('{"prompt": "Q", "completions": ["a"]}\n{"prompt": "Q", "completions": "a"}\n{"completions": ["a"]}\n')
    config = LabelConfig(input_file=str(source), output_file=str(tmp_path / "o.jsonl"), progress_bar=False,
                         judge={"type": "function", "function": f"{__name__}:length"})
    with pytest.raises(DataValidationError) as info:
        label(config)
    assert "generations.jsonl:2: field 'completions'" in str(info.value)
    assert "generations.jsonl:3: field 'prompt': missing" in str(info.value)


def _commented_judges(recipe: Path) -> list[dict]:
    """Every commented-out `# judge:` block of a recipe, uncommented and parsed."""
    blocks, lines = [], recipe.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# judge:"):
            body = [line[2:]]
            for following in lines[i + 1:]:
                if not following.startswith("#   "):
                    break
                body.append(following[2:])
            blocks.append(yaml.safe_load("\n".join(body))["judge"])
    return blocks


def test_every_commented_judge_example_is_valid_and_the_function_one_runs(tmp_path):
    blocks = _commented_judges(ROOT / "configs" / "label.yaml")
    assert sorted(b["type"] for b in blocks) == ["function", "http", "reward_model"]
    for block in blocks:
        judge_config(block)  # keys and values checked (building loads a model or needs a key)
    function = next(b for b in blocks if b["type"] == "function")
    from preftune.feedback.judges import build_judge

    judge = build_judge({**function, "function": str(ROOT / function["function"])})
    # "great fun film" -> 2 positive of 3 words; "a dull mess" -> -2 of 3
    assert judge.score(["Q:", "Q:"], ["great fun film", "a dull mess"]) == pytest.approx([2 / 3, -2 / 3])


def test_switching_the_judge_type_on_the_command_line_replaces_the_section(tmp_path):
    recipe = load_label_config(ROOT / "configs" / "label.yaml",
                               ["judge.type=function", "judge.function=examples/judges.py:positivity"])
    assert recipe.judge == {"type": "function", "function": "examples/judges.py:positivity"}
    same = load_label_config(ROOT / "configs" / "label.yaml", ["judge.type=chat_model", "judge.batch_size=2"])
    assert same.judge["model"] == {"name_or_path": "builtin:SmolLM2-135M-Instruct"} and same.judge["batch_size"] == 2
