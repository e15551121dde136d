"""Judges: the factory and its errors, the function judge, score -> preference, reply parsing, and the
local chat-model judge (both orders, exactly complementary, equal to a hand-computed forward pass)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from preftune.config import ConfigError
from preftune.feedback import judges
from preftune.feedback.judges import (
    PointwiseJudge,
    build_judge,
    judge_config,
    preference_from_scores,
    render_prompt,
)
from preftune.feedback.judges.templates import PAIRWISE_TEMPLATE, check_template, parse_score, parse_verdict


def length_score(completion):
    return len(completion)


def scaled_length(prompt, completion, scale=1.0):
    """Uses the prompt: the completion's length minus the prompt's, times ``scale``."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return scale * (len(completion) - len(text))


def picky(completion):
    return None if "???" in completion else math.nan if "nan" in completion else len(completion)


def _function_judge(name: str, **extra):
    return build_judge({"type": "function", "function": f"{__name__}:{name}", **extra})


def test_function_judge_scores_with_one_or_two_arguments_and_kwargs():
    assert _function_judge("length_score").score(["p", "p"], ["abc", ""]) == [3.0, 0.0]
    judge = _function_judge("scaled_length", kwargs={"scale": 2.0})
    # 2 * (len("abcd") - len("ab")) = 4 ; 2 * (len("x") - len("hey")) = -4 (the last message of a conversation)
    assert judge.score(["ab", [{"role": "user", "content": "hey"}]], ["abcd", "x"]) == [4.0, -4.0]
    assert judge.summary() == {"judged": 2, "no_result": 0}


def test_function_judge_counts_results_that_are_not_numbers():
    judge = _function_judge("picky")
    assert judge.score(["p"] * 3, ["ok", "??? what", "nan"]) == [2.0, None, None]
    assert judge.summary() == {"judged": 3, "no_result": 2, "unparsable": 2}


def test_function_judge_from_a_file_path(tmp_path):
    module = tmp_path / "my_judges.py"
    module.write_text("def shouting(completion):\n    return sum(c.isupper() for c in completion)\n")
    judge = build_judge({"type": "function", "function": f"{module}:shouting"})
    assert judge.score(["p", "p"], ["HeLLo", "quiet"]) == [3.0, 0.0]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"type": "function", "function": "no_colon"}, r"'judge.function': expected 'module:function'"),
        ({"type": "function", "function": "preftune_no_such_module:f"}, r"cannot import 'preftune_no_such_module'"),
        ({"type": "function", "function": f"{__name__}:nothing_here"}, r"has no function 'nothing_here'"),
        ({"type": "function", "funtion": "x:y"}, r"unknown config key 'judge.funtion' \(did you mean 'judge.function'\?\)"),
        ({"type": "functon"}, r"'judge.type': expected one of .* \(did you mean 'function'\?\)"),
        ({"function": "x:y"}, r"'judge.type': expected one of function, reward_model, sequence_classifier, chat_model, http, constitution, got None"),
        ({"type": "chat_model", "batch_size": "big"}, r"'judge.batch_size': expected an integer"),
        ({"type": "http", "model": "m", "api_key": "sk-123"}, r"do not put API keys in config files"),
    ],
)
def test_bad_judge_config_names_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        build_judge(values)


def test_a_judge_kind_whose_module_is_missing_gets_a_clear_error(monkeypatch):
    monkeypatch.setitem(judges.JUDGES, "reward_model", "preftune.feedback.judges.not_written_yet:RewardModelJudge")
    with pytest.raises(ConfigError, match=r"judge type 'reward_model' is not available .*not_written_yet.py is missing"):
        build_judge({"type": "reward_model"})


def test_a_missing_dependency_of_a_judge_module_is_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "judge_with_missing_dep.py").write_text("import preftune_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(judges.JUDGES, "odd", "judge_with_missing_dep:Judge")
    with pytest.raises(ModuleNotFoundError, match="preftune_absent_dependency"):
        build_judge({"type": "odd"})
    sys.modules.pop("judge_with_missing_dep", None)


def test_judge_config_checks_without_building():
    cls, config = judge_config({"type": "chat_model", "model": {"name_or_path": "/nowhere"}, "batch_size": 2})
    assert cls.__name__ == "ChatModelJudge" and config.batch_size == 2 and config.model.name_or_path == "/nowhere"


def test_preference_from_scores_and_pointwise_compare():
    assert [preference_from_scores(*p) for p in [(2, 1), (1, 1), (0, 1), (None, 1), (1, None)]] == [1.0, 0.5, 0.0, None, None]

    class Lengths(PointwiseJudge):
        def score(self, prompts, completions):
            return self.tally([None if c == "?" else float(len(c)) for c in completions])

    judge = Lengths()
    assert judge.compare(["p"] * 4, ["aa", "a", "aa", "?"], ["a", "aa", "bb", "a"]) == [1.0, 0.0, 0.5, None]
    assert judge.summary() == {"judged": 8, "no_result": 1}
    with pytest.raises(ValueError, match="lengths"):
        judge.compare(["p"], ["a", "b"], ["c", "d"])


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [("A", "A"), (" b.", "B"), ("(B)", "B"), ("Response A", "A"), ("[[B]]", "B"), ("My verdict: [[A]]", "A"),
     ("A or B", None), ("Both are fine.", None), ("[[A]] ... [[B]]", None), ("", None), ("AB", None)],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    ("reply", "score"),
    [("7", 7.0), ("Score: 8.5/10", 8.5), ("[[3]] (was 9 before)", 3.0), ("-2", -2.0), ("no idea", None), ("", None)],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_templates_must_use_exactly_their_placeholders():
    check_template(PAIRWISE_TEMPLATE, "pairwise", "judge.template")
    with pytest.raises(ConfigError, match=r"'judge.template': a pairwise template must use exactly .*it uses \{first\}, \{prompt\}"):
        check_template("{prompt} {first}", "pairwise", "judge.template")
    with pytest.raises(ConfigError, match="not a valid template"):
        check_template("{prompt", "pointwise", "judge.template")


def test_render_prompt():
    assert render_prompt("hi") == "hi"
    assert render_prompt([{"role": "user", "content": "hi"}]) == "hi"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render_prompt(conversation) == "System: Be brief.\n\nUser: hi"


# ---------------------------------------------------------------- the local chat-model judge

TEMPLATE = "Q: {prompt}\nA) {first}\nB) {second}\nBetter?"


@pytest.fixture(scope="module")
def chat_judge(tiny_model_dir):
    return build_judge({"type": "chat_model", "model": {"name_or_path": str(tiny_model_dir)}, "template": TEMPLATE,
                        "batch_size": 2})


def _p_a_by_hand(judge, text: str) -> float:
    """P("A") over {"A", "B"} at the next token after the ChatML generation header, one unpadded sequence."""
    rendered = f"<s><|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    ids = judge.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = judge.model(input_ids=ids).logits[0, -1]
    a, b = judge.tokenizer.encode("A", add_special_tokens=False)[0], judge.tokenizer.encode("B", add_special_tokens=False)[0]
    return torch.softmax(logits[[a, b]].double(), dim=0)[0].item()


PROMPTS = ["Review the film.", [{"role": "user", "content": "Was it good?"}], "Say hi.", "Rate it."]
FIRSTS = ["A marvel of production design.", "Loud and pointless.", "hello", "same answer"]
SECONDS = ["Dull.", "One of the best movies of the year.", "hi there, friend", "same answer"]


def test_chat_judge_swapped_inputs_give_exactly_complementary_probabilities(chat_judge):
    forward = chat_judge.compare(PROMPTS, FIRSTS, SECONDS)  # batch_size 2: two forward passes
    backward = chat_judge.compare(PROMPTS, SECONDS, FIRSTS)
    assert all(0.0 <= p <= 1.0 for p in forward)
    assert [f + b for f, b in zip(forward, backward, strict=True)] == [1.0, 1.0, 1.0, 1.0]  # exact, not approx
    assert forward[3] == 0.5  # identical answers


def test_chat_judge_averages_both_orders_as_computed_by_hand(chat_judge):
    """P(first better) = (P_A(first shown as A) + 1 - P_A(second shown as A)) / 2 with P_A read from
    unpadded single-sequence forward passes; the judge pads batches on the left, hence the tolerance."""
    results = chat_judge.compare(PROMPTS[:3], FIRSTS[:3], SECONDS[:3])
    for prompt, first, second, result in zip(PROMPTS[:3], FIRSTS[:3], SECONDS[:3], results, strict=True):
        shown = render_prompt(prompt)
        p_first_as_a = _p_a_by_hand(chat_judge, TEMPLATE.format(prompt=shown, first=first, second=second))
        p_second_as_a = _p_a_by_hand(chat_judge, TEMPLATE.format(prompt=shown, first=second, second=first))
        assert result == pytest.approx((p_first_as_a + 1 - p_second_as_a) / 2, abs=1e-5)
    assert chat_judge.summary()["no_result"] == 0


def test_chat_judge_config_errors_come_before_loading():
    with pytest.raises(ConfigError, match="'judge.template': a pairwise template"):
        build_judge({"type": "chat_model", "model": {"name_or_path": "/no/such/model"}, "template": "{prompt}"})
    with pytest.raises(ConfigError, match="'judge.model.name_or_path'"):
        build_judge({"type": "chat_model"})
