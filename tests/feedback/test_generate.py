"""``preftune generate``: K completions per prompt, equal to a hand-written ``model.generate`` call,
deterministic for a seed, resumable after a crash (partial line discarded), adapters, prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from preftune.cli import main
from preftune.config import ConfigError
from preftune.data import DataValidationError
from preftune.feedback import sampling
from preftune.feedback.generate import GenerateConfig, PromptsConfig, generate, load_generate_config
from preftune.feedback.sampling import (
    HFSampler,
    SamplingConfig,
    load_for_sampling,
    load_tokenizer_for,
)

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Write a movie review:", [{"role": "user", "content": "What did you think of the film?"}],
           "Review this film:", "Your opinion of the movie:", "One sentence on the plot:"]


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    return path


def make_config(model_dir, prompts_file, out, **sampling_values) -> GenerateConfig:
    values = {"num_samples": 3, "max_new_tokens": 6, "temperature": 0.9, "top_p": 0.95, "seed": 7, **sampling_values}
    config = GenerateConfig(prompts=PromptsConfig(file=str(prompts_file)), sampling=SamplingConfig(**values),
                            batch_size=2, output_file=str(out), progress_bar=False)
    config.model.name_or_path = str(model_dir)
    return config


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class CountingSampler:
    """Wraps a sampler and records which prompt indices it was asked for."""

    def __init__(self, inner):
        self.inner, self.asked = inner, []

    def sample(self, prompt_ids, indices):
        self.asked += indices
        return self.inner.sample(prompt_ids, indices)


@pytest.fixture(scope="module")
def tiny_sampler_parts(tiny_model_dir):
    return load_for_sampling(str(tiny_model_dir), GenerateConfig().model), load_tokenizer_for(str(tiny_model_dir))


def test_rows_match_a_hand_written_generate_call(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, write_prompts(tmp_path / "prompts.jsonl"), tmp_path / "out.jsonl")
    result = generate(config)
    rows = read(tmp_path / "out.jsonl")
    assert (result.prompts, result.generated, result.resumed) == (5, 5, 0)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4] and [r["prompt"] for r in rows] == PROMPTS
    assert all(len(r["completions"]) == 3 and all(isinstance(c, str) for c in r["completions"]) for r in rows)
    assert rows[0]["model"] == str(tiny_model_dir)
    assert rows[0]["generation"] == {"num_samples": 3, "max_new_tokens": 6, "temperature": 0.9, "top_p": 0.95,
                                     "top_k": 0, "seed": 7, "chat_template": True}

    # greedy, the first batch (prompts 0 and 1) by hand: ChatML written out, left padding, model.generate; the
    # sampled rows above come from preftune's decode loop (tests/feedback/test_decode.py), whose greedy tokens
    # must be generate's
    greedy = make_config(tiny_model_dir, tmp_path / "prompts.jsonl", tmp_path / "greedy.jsonl", temperature=0.0)
    generate(greedy)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    texts = [f"<s><|im_start|>user\n{PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n",
             f"<s><|im_start|>user\n{PROMPTS[1][0]['content']}<|im_end|>\n<|im_start|>assistant\n"]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    out = model.eval().generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=[1])
    expected = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    rows = read(tmp_path / "greedy.jsonl")
    assert rows[0]["completions"] + rows[1]["completions"] == [expected[0]] * 3 + [expected[1]] * 3


def test_same_seed_same_file_other_seed_other_completions(tiny_model_dir, tmp_path, tiny_sampler_parts):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:3])
    sampler = HFSampler(*tiny_sampler_parts, SamplingConfig(num_samples=3, max_new_tokens=6, temperature=0.9, top_p=0.95, seed=7))
    generate(make_config(tiny_model_dir, prompts, tmp_path / "a.jsonl"))
    generate(make_config(tiny_model_dir, prompts, tmp_path / "b.jsonl"), sampler=sampler)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    sampler.sampling = SamplingConfig(num_samples=3, max_new_tokens=6, temperature=0.9, top_p=0.95, seed=8)
    generate(make_config(tiny_model_dir, prompts, tmp_path / "c.jsonl", seed=8), sampler=sampler)
    assert [r["completions"] for r in read(tmp_path / "c.jsonl")] != [r["completions"] for r in read(tmp_path / "a.jsonl")]


def test_the_file_does_not_depend_on_the_batch_size(tiny_model_dir, tmp_path, tiny_sampler_parts):
    """Continuous batching: prompt i's samples depend on the seed and i only, so batch sizes 1, 2 and 5 (one,
    two and five prompts decoding at once, ended rows refilled) and a sampler asked batch by batch (no
    ``stream``) write the same bytes."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    files = []
    for batch_size in (1, 2, 5):
        config = make_config(tiny_model_dir, prompts, tmp_path / f"b{batch_size}.jsonl", max_new_tokens=10)
        config.batch_size = batch_size
        generate(config, sampler=HFSampler(*tiny_sampler_parts, config.sampling))
        files.append(Path(config.output_file).read_bytes())
    config = make_config(tiny_model_dir, prompts, tmp_path / "by-batch.jsonl", max_new_tokens=10)
    sampler = CountingSampler(HFSampler(*tiny_sampler_parts, config.sampling))
    generate(config, sampler=sampler)
    assert sampler.asked == [0, 1, 2, 3, 4]
    assert files[0] == files[1] == files[2] == Path(config.output_file).read_bytes()
    rows = read(Path(config.output_file))
    assert len({len(c) for r in rows for c in r["completions"]}) > 1  # completions of several lengths


def test_resume_discards_a_partial_line_and_generates_only_what_is_missing(tiny_model_dir, tmp_path, tiny_sampler_parts):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    full = tmp_path / "full.jsonl"
    generate(make_config(tiny_model_dir, prompts, full))
    lines = full.read_text().splitlines(keepends=True)
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_text(lines[0] + lines[1] + lines[2][:25])  # batch 0 written, batch 1 cut mid-line
    config = make_config(tiny_model_dir, prompts, crashed)
    sampler = CountingSampler(HFSampler(*tiny_sampler_parts, config.sampling))
    result = generate(config, sampler=sampler)
    assert sampler.asked == [2, 3, 4] and (result.generated, result.resumed) == (3, 2)
    assert crashed.read_bytes() == full.read_bytes()  # as if never interrupted
    again = CountingSampler(sampler.inner)
    assert generate(config, sampler=again).generated == 0 and again.asked == []


def test_a_file_from_other_settings_or_prompts_is_not_mixed_in(tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 0, "prompt": PROMPTS[0], "completions": ["x"], "model": str(tiny_model_dir),
                               "generation": {"num_samples": 3, "max_new_tokens": 6, "temperature": 0.9, "top_p": 0.95,
                                              "top_k": 0, "seed": 1, "chat_template": True}}) + "\n")
    with pytest.raises(ValueError, match=r"out.jsonl:1 was generated with other settings \(seed: 1 there, 7 now\)"):
        generate(make_config(tiny_model_dir, prompts, out))
    write_prompts(prompts, ["a different first prompt", *PROMPTS[1:]])
    with pytest.raises(ValueError, match=r"out.jsonl:1: its prompt is not prompt 0"):
        generate(make_config(tiny_model_dir, prompts, out, seed=1))


def test_an_adapter_folder_is_merged_into_its_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # its path becomes the adapter's base_model_name_or_path
    torch.manual_seed(0)
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")  # no tokenizer saved: the base's is used
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:2])
    generate(make_config(tmp_path / "adapter", prompts, tmp_path / "adapter.jsonl"))
    generate(make_config(tiny_model_dir, prompts, tmp_path / "base.jsonl"))

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    merged = merged.merge_and_unload().eval()
    tokenizer = load_tokenizer_for(str(tiny_model_dir))
    config = make_config(tmp_path / "adapter", prompts, tmp_path / "by_hand.jsonl")
    generate(config, sampler=HFSampler(merged, tokenizer, config.sampling))
    by_adapter = [r["completions"] for r in read(tmp_path / "adapter.jsonl")]
    assert by_adapter == [r["completions"] for r in read(tmp_path / "by_hand.jsonl")]
    assert by_adapter != [r["completions"] for r in read(tmp_path / "base.jsonl")]


def test_csv_prompts_with_a_column_mapping_unique_and_limit(tiny_model_dir, tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text('question,other\n"Why, though?",1\nHow?,2\n"Why, though?",3\nWhen?,4\n')
    config = make_config(tiny_model_dir, csv, tmp_path / "out.jsonl", num_samples=1, temperature=0.0)
    config.prompts = PromptsConfig(file=str(csv), columns={"prompt": "question"}, unique=True, limit=2, chat_template=False)
    generate(config)
    rows = read(tmp_path / "out.jsonl")
    assert [r["prompt"] for r in rows] == ["Why, though?", "How?"]
    assert rows[0]["generation"]["chat_template"] is False and len(rows[0]["completions"]) == 1


def test_bad_prompts_are_reported_with_file_and_line_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sampling, "load_for_sampling", lambda *a: pytest.fail("a model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": ""}\n{"text": "no prompt"}\nnot json\n')
    with pytest.raises(DataValidationError) as info:
        generate(make_config(tiny_model_dir, bad, tmp_path / "out.jsonl"))
    message = str(info.value)
    assert "bad.jsonl:2: field 'prompt'" in message and "bad.jsonl:3: field 'prompt': missing" in message
    assert "bad.jsonl:4: not valid JSON" in message
    messages = write_prompts(tmp_path / "messages.jsonl", PROMPTS[:2])
    config = make_config(tiny_model_dir, messages, tmp_path / "out.jsonl")
    config.prompts.chat_template = False
    with pytest.raises(DataValidationError, match="prompts given as messages need a chat template"):
        generate(config)


def test_backend_choice(monkeypatch):
    if not sampling.vllm_usable():
        assert sampling.pick_backend("auto") == "hf"
        with pytest.raises(ValueError, match="backend: vllm was asked for but .*set backend: hf"):
            sampling.pick_backend("vllm")
    monkeypatch.setattr(sampling, "vllm_usable", lambda: True)
    assert sampling.pick_backend("auto") == "vllm" and sampling.pick_backend("hf") == "hf"


def test_cli_generate_and_the_recipe(tiny_model_dir, tmp_path, capsys):
    recipe = load_generate_config(ROOT / "configs" / "generate.yaml")
    assert Path(recipe.prompts.file).is_file() and recipe.output_file.startswith("runs/")
    write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:2])
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)}, "prompts": {"file": "prompts.jsonl"},
                                    "sampling": {"num_samples": 2, "max_new_tokens": 4}, "progress_bar": False,
                                    "output_file": str(tmp_path / "out.jsonl")}))
    assert main(["generate", str(path), "sampling.seed=3"]) == 0  # the prompts file is found beside the recipe
    assert "2 prompts (2 generated now, 0 already there)" in capsys.readouterr().out
    assert read(tmp_path / "out.jsonl")[0]["generation"]["seed"] == 3
    assert main(["generate", str(path), "sampling.temprature=1"]) == 2
    assert "unknown config key 'sampling.temprature' (did you mean 'sampling.temperature'?)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'sampling.num_samples': must be > 0"):
        load_generate_config(path, ["sampling.num_samples=0"])
