"""QLoRA (Dettmers et al. 2023) on CPU: bitsandbytes NF4 base weights, LoRA adapters trained on top.

One QLoRA DPO run and one LoRA run on the unquantized model, with the same data, seed and settings, are
shared by the tests below (3 steps each, lr 1e-2, so the adapters move well off zero).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from preftune import modeling
from preftune.config import ConfigError, ModelConfig, config_from_dict
from preftune.training import train

from model_logps import heldout_pairs, mean_sums, reference_means

BETA = 0.1


def qlora_config(model_dir, pairs_file, out, quantization: str | None = "4bit") -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "quantization": quantization},
        "data": {"train_file": str(pairs_file), "eval_fraction": 0.25, "max_length": 96, "max_prompt_length": 32},
        "objective": {"name": "dpo", "beta": BETA},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "reference": {"cache_dir": str(out / "refcache")},
        "training": {"output_dir": str(out / f"run-{quantization}"), "batch_size": 4, "max_steps": 3,
                     "learning_rate": 1e-2, "lr_scheduler": "constant", "logging_steps": 1, "save_steps": None,
                     "progress_bar": False, "tensorboard": False, "eval_batch_size": 8, "seed": 3},
    }


@pytest.fixture(scope="module")
def runs(tiny_model_dir, pairs_file, tmp_path_factory):
    """quantization -> (the run's result, its config)."""
    out = tmp_path_factory.mktemp("qlora")
    configs = {q: config_from_dict(qlora_config(tiny_model_dir, pairs_file, out, q)) for q in ("4bit", None)}
    return {q: (train(copy.deepcopy(config)), config) for q, config in configs.items()}


def independent_nf4(model_dir):
    """The tiny model quantized by transformers + bitsandbytes directly, with QLoRA's settings. Its layers
    compute in fp32 as asked: on an AVX-512-BF16 CPU bitsandbytes would otherwise switch a layer to its
    bf16 inference kernel at its first no-grad call in eval mode (``modeling.keep_4bit_layers_trainable``
    turns that off, as in preftune's own models)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=settings, device_map="cpu")
    modeling.keep_4bit_layers_trainable(model)
    return model


def test_qlora_dpo_trains_against_the_adapter_off_quantized_base(runs, tiny_model_dir):
    """Step 1 is log 2 (LoRA's B starts at 0: policy == reference). After 3 steps the adapters are on and
    the policy has moved, yet the reference the run evaluated against (recovered from its eval metrics as
    logps - rewards / β) is still exactly the NF4 base, computed here from a separately quantized model,
    and measurably not the unquantized one (a random tiny model predicts nearly uniformly, so quantization
    moves its log-probs only by hundredths of a nat)."""
    from transformers import AutoModelForCausalLM

    result, config = runs["4bit"]
    rows = [row for row in result.history if "loss" in row]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "(4bit quantized)" in (result.run_dir / "train.log").read_text()
    examples = heldout_pairs(config)
    logged = reference_means(result.eval_after, BETA)
    nf4 = mean_sums(independent_nf4(tiny_model_dir), examples)
    full = mean_sums(AutoModelForCausalLM.from_pretrained(tiny_model_dir), examples)
    tolerance = 1e-4  # float32 sums of ~250 nats, batched in the run, one by one here (measured 2e-5)
    assert logged == pytest.approx(nf4, abs=tolerance)
    # the check tells the quantized base from the unquantized one: measured 0.033 and 0.094 nats apart
    assert min(abs(f - q) for f, q in zip(full, nf4, strict=True)) > 100 * tolerance
    assert abs(result.eval_after["eval/rewards/margins"]) > 1e-3  # the adapters are on in the policy


def lora_deltas(final_dir) -> torch.Tensor:
    """Every adapted layer's ΔW = B·A, flattened and concatenated in name order."""
    weights = load_file(str(final_dir / "adapter_model.safetensors"))
    return torch.cat([(weights[k.replace("lora_A", "lora_B")] @ weights[k]).flatten()
                      for k in sorted(weights) if "lora_A" in k])


def test_qlora_result_is_close_to_lora_on_the_unquantized_model(runs, tiny_model_dir):
    """How close, and why. NF4 rounds each weight to one of 16 levels placed for a Gaussian, scaled per
    block of 64: a 16-level quantizer of N(0, σ²) has an RMS error of about 0.1σ (Max 1960: MSE 0.0095σ²),
    measured here as 9.2% of the weights' norm. Gradients through weights 9% off point the same way, but
    Adam's first updates are ≈ lr·sign(g) per element, so elements whose gradient is near zero can flip:
    the measured adapters (ΔW = B·A over every adapted layer) after 3 steps differ by 33% of their norm,
    cosine 0.945. Tolerance: relative difference < 0.5 and cosine > 0.9. For scale, a LoRA run on the same
    data with another seed (another LoRA init and batch order) measured relative difference 1.38 and
    cosine 0.00, so these bounds do separate "the same training, quantized" from "other training"."""
    import bitsandbytes.functional as bnb
    from transformers import AutoModelForCausalLM

    layer = independent_nf4(tiny_model_dir).model.layers[0].self_attn.q_proj
    dequantized = bnb.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    weight = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].self_attn.q_proj.weight.detach()
    assert 0.05 < float((dequantized - weight).norm() / weight.norm()) < 0.15
    quantized, full = lora_deltas(runs["4bit"][0].final_dir), lora_deltas(runs[None][0].final_dir)
    assert float((quantized - full).norm() / full.norm()) < 0.5
    assert float(torch.nn.functional.cosine_similarity(quantized, full, dim=0)) > 0.9
    q_losses, f_losses = ([r["loss"] for r in runs[q][0].history if "loss" in r] for q in ("4bit", None))
    assert q_losses[0] == f_losses[0] == pytest.approx(math.log(2), abs=1e-6)


def test_qlora_final_is_an_adapter_on_the_unquantized_base_and_loads_back(runs, tiny_model_dir):
    """final/ names the unquantized base (absolute path) and holds no quantization settings: peft loads it
    on the full-precision base. Loaded by preftune onto an NF4 base again, it reproduces the policy the run
    last evaluated (its eval/logps/*), so nothing was lost in the export."""
    from peft import AutoPeftModelForCausalLM

    result, config = runs["4bit"]
    final = result.final_dir
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert "quantization" not in json.dumps(adapter)
    full = AutoPeftModelForCausalLM.from_pretrained(final)
    assert type(full.get_base_model().model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear
    reloaded = modeling.load_merged(str(final), ModelConfig(quantization="4bit"))
    chosen, rejected = mean_sums(reloaded, heldout_pairs(config))
    after = result.eval_after
    assert (chosen, rejected) == pytest.approx((after["eval/logps/chosen"], after["eval/logps/rejected"]), abs=1e-4)


def test_8bit_base_trains_lora(tiny_model_dir, pairs_file, tmp_path):
    """LLM.int8 layers. Step 1 is log 2 only to ~1e-4 here: on a CPU bitsandbytes returns the int8 matmul in
    fp16, and peft casts the adapter-on output back to fp32 while the adapter-off reference keeps fp16
    activations, so policy and reference differ by fp16 rounding (~1e-3 relative on a sum of ~250 nats)."""
    import bitsandbytes as bnb

    raw = qlora_config(tiny_model_dir, pairs_file, tmp_path, "8bit")
    result = train(config_from_dict(raw))
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert abs(losses[-1] - math.log(2)) > 5e-3 and all(math.isfinite(x) for x in losses)
    model = modeling.load_merged(str(result.final_dir), ModelConfig(quantization="8bit"))
    assert isinstance(model.get_base_model().model.layers[0].self_attn.k_proj, bnb.nn.Linear8bitLt)


def test_quantization_needs_lora_and_an_adapter_export(base_config):
    raw = copy.deepcopy(base_config)
    raw["model"]["quantization"] = "4bit"
    with pytest.raises(ConfigError, match=r"'model.quantization' is '4bit' but lora.enabled is false.*lora.enabled: true"):
        config_from_dict(raw)
    raw["lora"] = {"enabled": True, "save": "merged"}
    with pytest.raises(ConfigError, match=r"'lora.save': merged would fold the adapter into rounded"):
        config_from_dict(raw)
    raw["lora"]["save"] = "adapter"
    with pytest.raises(ConfigError, match=r"'training.stages': sDPO merges each stage's adapter"):
        config_from_dict(raw, ["training.stages=2"])
    with pytest.raises(ConfigError, match=r"'model.quantization': expected one of '4bit', '8bit' or null"):
        config_from_dict(base_config, ["model.quantization=3bit"])


def test_fp16_on_a_cpu_is_refused_not_silently_fp32(base_config):
    """accelerate sets up fp16 autocast and its gradient scaler on GPUs only; on a CPU it would train in
    fp32 without a word, so preftune refuses, naming the key."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is supported here")
    with pytest.raises(ConfigError, match=r"'training.precision': fp16 needs a GPU .* use bf16 or fp32"):
        train(config_from_dict(base_config, ["training.precision=fp16"]))


def test_gradient_checkpointing_through_the_quantized_base_changes_nothing(runs):
    """prepare_model_for_kbit_training wires checkpointing so gradients still reach the adapters through the
    frozen NF4 layers: the same run with it on has the same losses and gradient norms."""
    plain, config = runs["4bit"]
    config = copy.deepcopy(config)
    config.model.gradient_checkpointing = True
    config.training.output_dir = str(plain.run_dir.parent / "run-4bit-gc")
    checkpointed = train(config)
    for x, y in zip((r for r in plain.history if "loss" in r), (r for r in checkpointed.history if "loss" in r),
                    strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


def test_bf16_storage_leaves_quantized_layers_alone(tiny_model_dir):
    """Under bf16, frozen linear weights are stored in bf16; bitsandbytes' Linear4bit subclasses nn.Linear
    but holds packed NF4 bytes, which must stay as they are (same dtype, same bytes). What moves is exactly
    the frozen fp32 linears left unquantized: the LM head (if not tied to the embeddings)."""
    from bitsandbytes.nn import Linear4bit

    from preftune.training.precision import store_frozen_linears_in_bf16

    model = independent_nf4(tiny_model_dir)
    model.requires_grad_(False)
    quantized = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert quantized
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    expected = 0 if tied else head.weight.numel() + (head.bias.numel() if head.bias is not None else 0)
    assert store_frozen_linears_in_bf16(model) == expected
    for name, module in model.named_modules():
        if name in quantized:
            assert module.weight.dtype == quantized[name].dtype == torch.uint8
            assert torch.equal(module.weight, quantized[name])
    assert head.weight.dtype == (torch.float32 if tied else torch.bfloat16)


def test_4bit_layers_still_pass_gradients_after_a_no_grad_eval_forward(tiny_model_dir):
    """On a CPU with AVX-512-BF16, bitsandbytes repacks a 4-bit layer for its inference kernel the first time
    the layer runs in eval mode without gradients (as a reference forward does); that kernel passes no
    gradient back. preftune's loaded models have the repacking off in all 14 quantized projections (2 layers
    x 7), so after such a forward q_proj's input gradient is still the one of y = x Wᵀ with W its dequantized
    weight: d Σy / dx = the column sums of W, for every row of x."""
    import bitsandbytes.functional as bnb

    model = modeling.load_causal_lm(str(tiny_model_dir), ModelConfig(quantization="4bit")).eval()
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(layers) == 14 and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer(torch.randn(2, 64))
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    weight = bnb.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, -1), atol=1e-5, rtol=1e-5)
