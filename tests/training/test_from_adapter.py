"""DPO from an SFT adapter (the QLoRA pipeline of the DPO literature: SFT with LoRA, then DPO): with
``model.name_or_path`` a PEFT adapter folder, DPO trains that adapter further and the reference is the
SFT model (base + SFT adapter, frozen), never the bare base."""

from __future__ import annotations

import copy
import json
import math

import pytest
from safetensors.torch import load_file

from preftune.config import ConfigError, config_from_dict
from preftune.evaluation.heldout import evaluate_model
from preftune.training import train

from model_logps import heldout_pairs, mean_sums, reference_means

BETA = 0.1
LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, pairs_file, tmp_path_factory):
    """`preftune sft` with LoRA on the pairs' chosen completions: final/ is an adapter well off zero."""
    out = tmp_path_factory.mktemp("sft")
    raw = {"model": {"name_or_path": str(tiny_model_dir)},
           "data": {"train_file": str(pairs_file), "max_length": 96, "max_prompt_length": 32},
           "objective": {"name": "sft"}, "lora": LORA,
           "training": {"output_dir": str(out / "sft"), "batch_size": 4, "max_steps": 4, "learning_rate": 3e-2,
                        "save_steps": None, "progress_bar": False, "tensorboard": False, "seed": 1}}
    return train(config_from_dict(raw), command="sft").final_dir


def dpo_config(adapter, pairs_file, out, *overrides: str):
    raw = {"model": {"name_or_path": str(adapter)},
           "data": {"train_file": str(pairs_file), "eval_fraction": 0.25, "max_length": 96, "max_prompt_length": 32},
           "objective": {"name": "dpo", "beta": BETA}, "lora": {"enabled": True},
           "reference": {"cache_dir": str(out / "refcache")},
           "training": {"output_dir": str(out / "dpo"), "batch_size": 4, "max_steps": 3, "learning_rate": 1e-2,
                        "lr_scheduler": "constant", "logging_steps": 1, "save_steps": None, "progress_bar": False,
                        "tensorboard": False, "eval_batch_size": 8, "seed": 3}}
    return config_from_dict(raw, list(overrides))


@pytest.fixture(scope="module")
def dpo_run(sft_adapter, pairs_file, tmp_path_factory):
    config = dpo_config(sft_adapter, pairs_file, tmp_path_factory.mktemp("dpo-from-sft"))
    return train(copy.deepcopy(config)), config


def sft_model(base_dir, adapter):
    """Base + SFT adapter, loaded by peft directly (not merged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter))


def test_dpo_trains_the_sft_adapter_against_the_sft_model(dpo_run, sft_adapter, tiny_model_dir):
    """Step 1: policy == reference == the SFT model, so every implicit reward is 0 and the loss is exactly
    log 2 (against the bare base it would not be: the SFT adapter moved the log-probs, checked below).
    After 3 steps the reference the run evaluated against (logps - rewards / β from its eval metrics) is
    the SFT model's log-probs computed here with peft on a fresh base, and not the bare base's."""
    from transformers import AutoModelForCausalLM

    result, config = dpo_run
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    examples = heldout_pairs(config)
    sft = mean_sums(sft_model(tiny_model_dir, sft_adapter), examples)
    bare = mean_sums(AutoModelForCausalLM.from_pretrained(tiny_model_dir), examples)
    assert reference_means(result.eval_after, BETA) == pytest.approx(sft, abs=1e-4)
    assert min(abs(s - b) for s, b in zip(sft, bare, strict=True)) > 1.0  # SFT moved the model
    assert abs(result.eval_after["eval/rewards/margins"]) > 1e-3  # and DPO moved it again
    assert "training the LoRA adapter" in (result.run_dir / "train.log").read_text()


def test_the_new_adapter_continues_the_sft_one_and_loads(dpo_run, sft_adapter, tiny_model_dir):
    """final/ is an adapter of the same shape as the SFT one (its r and target modules, not lora.*'s
    defaults), moved by DPO, naming the bare base; peft loads it and it reproduces the run's last eval."""
    from peft import AutoPeftModelForCausalLM

    result, config = dpo_run
    adapter = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    before = load_file(str(sft_adapter / "adapter_model.safetensors"))
    after = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    assert max(float((before[k] - after[k]).abs().max()) for k in before) > 1e-3
    model = AutoPeftModelForCausalLM.from_pretrained(result.final_dir)
    chosen, rejected = mean_sums(model, heldout_pairs(config))
    assert chosen == pytest.approx(result.eval_after["eval/logps/chosen"], abs=1e-4)
    assert rejected == pytest.approx(result.eval_after["eval/logps/rejected"], abs=1e-4)


def test_preftune_eval_of_the_new_adapter_compares_it_with_the_sft_model(dpo_run, tmp_path):
    """The run's final/ records that training started from the SFT adapter: `preftune eval` uses that as
    the reference by default and reproduces the trainer's last held-out evaluation."""
    result, config = dpo_run
    config = copy.deepcopy(config)
    config.model.name_or_path = str(result.final_dir)
    config.training.output_dir = str(tmp_path / "eval")
    metrics = evaluate_model(config)
    for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen"):
        assert metrics[key] == pytest.approx(result.eval_after[key], abs=1e-5)


def test_precomputed_sft_reference_is_cached_apart_from_the_base(sft_adapter, tiny_model_dir, pairs_file, tmp_path):
    """The cache key covers the swapped-in adapter: a precomputed SFT reference gives the live run's losses,
    and the bare base's reference on the same data gets a cache file of its own."""
    live = train(dpo_config(sft_adapter, pairs_file, tmp_path, f"training.output_dir={tmp_path / 'live'}"))
    cached = train(dpo_config(sft_adapter, pairs_file, tmp_path, "reference.precompute=true",
                              f"training.output_dir={tmp_path / 'cached'}"))
    for x, y in zip((r for r in live.history if "loss" in r), (r for r in cached.history if "loss" in r), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    files = set((tmp_path / "refcache").glob("*.safetensors"))
    train(dpo_config(tiny_model_dir, pairs_file, tmp_path, "reference.precompute=true", "training.max_steps=1",
                     f"training.output_dir={tmp_path / 'base'}"))
    assert len(set((tmp_path / "refcache").glob("*.safetensors")) - files) == 2  # train + eval of the base


def test_an_adapter_start_needs_lora_enabled(sft_adapter, pairs_file, tmp_path):
    config = dpo_config(sft_adapter, pairs_file, tmp_path, "lora.enabled=false")
    with pytest.raises(ConfigError, match=r"'lora.enabled': model.name_or_path .* is a LoRA adapter; set lora.enabled: true"):
        train(config)

