"""Constitutional AI pieces: the constitution file, ``preftune revise`` (answer -> critique -> revision against a
drawn principle, resumable) and the constitution judge (both orders, soft labels, one principle per pair)."""

from __future__ import annotations

import json

import pytest
import yaml

from preftune.config import ConfigError, ModelConfig
from preftune.feedback.constitution import BUNDLED, draw, load_constitution
from preftune.feedback.generate import PromptsConfig
from preftune.feedback.judges import build_judge
from preftune.feedback.revise import ReviseConfig, load_revise_config, revise


class EchoSampler:
    """Replies with the last user message's first word and a call number: every step can be traced."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.sampling = tokenizer, 0, None

    def sample(self, prompt_ids, indices):
        self.calls += 1
        out = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            last = text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
            out.append([f"{last.split()[0]}#{self.calls}"])
        return out


def test_the_bundled_constitution_and_seeded_draws():
    principles = load_constitution("", "constitution")
    assert [p.name for p in principles] == ["harmless", "honest", "respectful", "helpful"]
    assert draw(principles, 0, "x", 1) == draw(principles, 0, "x", 1)
    assert len({draw(principles, 0, "x", n).name for n in range(40)}) == 4  # every principle gets drawn
    assert load_constitution(BUNDLED, "k") == principles


def test_bad_constitution_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump([{"name": "x", "critique": "c"}]))
    with pytest.raises(ConfigError, match=r"c.yaml: principle 1 needs exactly the text fields"):
        load_constitution(path, "constitution")
    with pytest.raises(ConfigError, match=r"'constitution': constitution file .* does not exist"):
        load_constitution(tmp_path / "missing.yaml", "constitution")


def test_revise_chains_answer_critique_revision_and_resumes(tmp_path, tiny_model_dir):
    """Two passes: call 1 answers (the prompt's first word), then each pass asks the critique request (call 2, 4)
    and the revision request (call 3, 5), each reply echoing the first word of what it was asked. The completion
    is the last revision; the principles are the seeded draws for (seed, prompt index, pass)."""
    from preftune.feedback.sampling import load_tokenizer_for

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Tell me a joke", "Insult my neighbour"]))
    config = ReviseConfig(prompts=PromptsConfig(file=str(prompts)), model=ModelConfig(name_or_path=str(tiny_model_dir)),
                          revisions=2, output_file=str(tmp_path / "out.jsonl"), progress_bar=False)
    tokenizer = load_tokenizer_for(str(tiny_model_dir))
    principles = load_constitution("", "constitution")
    sampler = EchoSampler(tokenizer)
    assert revise(config, sampler)["revised"] == 2
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["initial"] == "Tell#1"
    assert [s["principle"] for s in first["steps"]] == [draw(principles, 0, 0, n).name for n in range(2)]
    critique_word = {p.name: p.critique.split()[0] for p in principles}
    revision_word = {p.name: p.revision.split()[0] for p in principles}
    assert [s["critique"] for s in first["steps"]] == [f"{critique_word[s['principle']]}#{c}" for s, c in
                                                      zip(first["steps"], (2, 4), strict=True)]
    assert first["completion"] == first["steps"][1]["revision"] == f"{revision_word[first['steps'][1]['principle']]}#5"
    assert revise(config, sampler)["revised"] == 0 and sampler.calls == 5  # a rerun does nothing
    with pytest.raises(ValueError, match="was generated with other settings"):
        revise(ReviseConfig(prompts=config.prompts, model=config.model, revisions=1, output_file=config.output_file,
                            progress_bar=False), sampler)


def test_revise_config_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "prompts": {"file": "p.jsonl"}, "revisions": 0}))
    with pytest.raises(ConfigError, match="'revisions': must be > 0"):
        load_revise_config(path)


def test_constitution_judge_is_antisymmetric_with_one_principle_per_pair(tiny_model_dir):
    """compare(a, b) + compare(b, a) == 1 exactly, a soft probability strictly inside (0, 1); the rendered
    question of both orders carries the same principle (the draw ignores the order)."""
    judge = build_judge({"type": "constitution", "model": {"name_or_path": str(tiny_model_dir)}, "seed": 3})
    ab = judge.compare(["Say hi"] * 2, ["hello there", "go away"], ["go away", "hello there"])
    assert ab[0] + ab[1] == 1.0 and 0.0 < ab[0] < 1.0 and ab[0] != 0.5
    one, two = judge._render("Say hi", "hello there", "go away"), judge._render("Say hi", "go away", "hello there")
    questions = [p.comparison for p in judge.principles]
    assert [q for q in questions if q in one] == [q for q in questions if q in two] and len([q for q in questions if q in one]) == 1
    with pytest.raises(ConfigError, match=r"\{principle\}"):
        build_judge({"type": "constitution", "model": {"name_or_path": str(tiny_model_dir)}, "template": "{prompt}"})
