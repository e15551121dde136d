"""End-to-end training on a tiny random Llama: outputs, equivalences, resume, guards."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.config import config_from_dict
from preftune.data import PairCollator, load_examples, tokenize_examples
from preftune.training import NonFiniteLossError, train

TRAIN_KEYS = {"step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
              "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_second"}


def run(raw: dict, *overrides: str):
    return train(config_from_dict(copy.deepcopy(raw), list(overrides)))


def train_rows(history):
    return [row for row in history if "loss" in row]


def test_dpo_run_writes_a_complete_run_directory(base_config):
    """Policy == reference at step 1, so every implicit reward is 0 and the DPO loss is exactly log 2."""
    result = run(base_config)
    rows = train_rows(result.history)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= TRAIN_KEYS
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-7)
    assert rows[0]["rewards/accuracies"] == 0.0
    evals = [r for r in result.history if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    run_dir = result.run_dir
    for name in ("config.yaml", "metrics.jsonl", "train.log", "final/README.md", "final/preftune_config.yaml"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard" / "preftune").glob("events.out.tfevents.*"))  # accelerate: <dir>/<project>
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000002", "step-00000003"] or sorted(
        p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert tokenizer.eos_token == "</s>" and model.config.num_hidden_layers == 2
    card = (run_dir / "final" / "README.md").read_text()
    assert "dpo" in card and "beta: 0.1" in card and "eval/rewards/accuracies" in card


def test_first_step_logps_match_a_full_logits_forward(base_config, tiny_model_dir):
    """Second implementation: log_softmax over the full [N, T, V] logits of an untouched copy of the model,
    summed over completion tokens, on the same first batch the trainer drew (batch_size = all 18 pairs)."""
    raw = copy.deepcopy(base_config)
    raw["training"].update(batch_size=18, max_steps=1)
    result = run(raw)
    config = config_from_dict(copy.deepcopy(raw))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples, _ = tokenize_examples(load_examples(config.data, "pairs", seed=3).train, tokenizer, config.data)
    batch = PairCollator(tokenizer.pad_token_id)(examples)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    sums = (token_logps * batch["completion_mask"][:, 1:]).sum(1)
    first = train_rows(result.history)[0]
    assert first["logps/chosen"] == pytest.approx(sums[:18].mean().item(), abs=1e-4)
    assert first["logps/rejected"] == pytest.approx(sums[18:].mean().item(), abs=1e-4)


def _final_weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.run_dir / "final" / "model.safetensors"))


def test_gradient_accumulation_1x8_equals_8x1(base_config, tmp_path):
    """One optimizer step over 8 pairs must not depend on how they are split into micro-batches: each
    example's loss is weighted 1/8 either way, so gradients, losses and updated weights agree. Weights to 1% of
    the learning rate (1e-3): Adam moves a weight whose gradient is near its epsilon by up to lr x (gradient's
    rounding error) / epsilon, and the two splits may multiply in different kernels (a product goes to oneDNN
    from ``kernels.MIN_MACS`` multiply-adds on; measured: one of 16,384 weights of an MLP gate 6e-6 apart),
    while a micro-batch dropped or weighted wrongly moves many weights by a good part of lr."""
    raw = copy.deepcopy(base_config)
    raw["data"]["eval_fraction"] = 0.0
    raw["training"].update(max_steps=2, save_steps=None, eval_before_training=False)
    one = run(raw, "training.batch_size=8", "training.gradient_accumulation_steps=1",
              f"training.output_dir={tmp_path / 'a'}")
    eight = run(raw, "training.batch_size=1", "training.gradient_accumulation_steps=8",
                f"training.output_dir={tmp_path / 'b'}")
    for a, b in zip(train_rows(one.history), train_rows(eight.history), strict=True):
        for key in ("loss", "logps/chosen", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    wa, wb = _final_weights(one), _final_weights(eight)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


def test_resume_after_a_crash_reproduces_the_uninterrupted_curve(base_config, tmp_path, monkeypatch):
    """Run 6 steps straight; then crash a second run during step 5 (checkpoint at 4), resume it, and
    compare: the resumed losses and final weights equal the uninterrupted run's."""
    raw = copy.deepcopy(base_config)
    raw["training"].update(max_steps=6, save_steps=2, save_total_limit=None)
    straight = run(raw, f"training.output_dir={tmp_path / 'straight'}")

    from preftune.training import loop as trainer_module

    original = trainer_module.Loop._optimizer_step

    def crash_at_step_5(self, step, stats):
        if step == 4:
            raise RuntimeError("simulated crash")
        return original(self, step, stats)

    monkeypatch.setattr(trainer_module.Loop, "_optimizer_step", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(raw, f"training.output_dir={tmp_path / 'crashed'}")
    monkeypatch.setattr(trainer_module.Loop, "_optimizer_step", original)
    resumed = run(raw, f"training.output_dir={tmp_path / 'crashed'}")
    assert resumed.eval_before is None  # the resumed run does not redo step-0 evaluation
    a, b = train_rows(straight.history), train_rows(resumed.history)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["lr"] == pytest.approx(y["lr"])
    wa, wb = _final_weights(straight), _final_weights(resumed)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)


def test_precomputed_reference_equals_live_reference_and_is_reused(base_config, other_model_dir, tmp_path,
                                                                   monkeypatch):
    """A reference that differs from the policy (other seed) makes step-1 losses differ from log 2; the
    precomputed cache must give the same losses as the live model, and a second run must reuse the file.
    A run whose numbers could differ in their last bits must not: it computes and writes its own tables. So do
    runs whose products would run on other kernels (bf16 emulated on another CPU), a padded run, and one of
    another log-prob revision (a cache written before the last layer computed only the rows read made the
    demo's untrained policy prefer 3 of 128 held-out pairs: rewards of ~1e-7 where they are 0 by definition)."""
    raw = copy.deepcopy(base_config)
    raw["reference"]["name_or_path"] = str(other_model_dir)
    live = run(raw, f"training.output_dir={tmp_path / 'live'}")
    cached = run(raw, "reference.precompute=true", f"training.output_dir={tmp_path / 'cached'}")
    assert train_rows(live.history)[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    for x, y in zip(train_rows(live.history), train_rows(cached.history), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["rewards/chosen"] == pytest.approx(y["rewards/chosen"], abs=1e-5)
    assert live.eval_after["eval/loss"] == pytest.approx(cached.eval_after["eval/loss"], abs=1e-5)
    files = list((tmp_path / "refcache").glob("*.safetensors"))
    assert len(files) == 2  # train and eval splits
    stamps = {f: f.stat().st_mtime_ns for f in files}
    run(raw, "reference.precompute=true", f"training.output_dir={tmp_path / 'again'}")
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    log_text = (tmp_path / "again" / "train.log").read_text()
    assert "reusing cached reference log-probs" in log_text
    from preftune.training import logps, reference

    for count, (name, *overrides) in enumerate([("padded", "training.packing=padded"), ("revision",),
                                                ("other-kernels",)], start=2):
        if name == "revision":
            monkeypatch.setattr(logps, "LOGPS_REVISION", logps.LOGPS_REVISION + 1)
        if name == "other-kernels":
            monkeypatch.setattr(reference, "kernel_choice", lambda precision, device: "emulated")
        run(raw, "reference.precompute=true", f"training.output_dir={tmp_path / name}", *overrides)
        assert len(list((tmp_path / "refcache").glob("*.safetensors"))) == 2 * count, name
        assert "reusing cached" not in (tmp_path / name / "train.log").read_text()


def test_lora_adapter_off_reference_equals_frozen_copy(base_config, tiny_model_dir, tmp_path):
    """With LoRA the reference is the policy with adapters disabled; it must match loading the base model
    again as an explicit frozen reference, step by step."""
    raw = copy.deepcopy(base_config)
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    raw["training"]["learning_rate"] = 1e-2
    adapter_off = run(raw, f"training.output_dir={tmp_path / 'off'}")
    frozen = run(raw, f"reference.name_or_path={tiny_model_dir}", f"training.output_dir={tmp_path / 'frozen'}")
    rows_a, rows_b = train_rows(adapter_off.history), train_rows(frozen.history)
    assert rows_a[-1]["rewards/margins"] != 0.0
    for x, y in zip(rows_a, rows_b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], abs=1e-6)
    final = adapter_off.run_dir / "final"
    assert (final / "adapter_config.json").is_file()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    from peft import AutoPeftModelForCausalLM

    # the exported adapter holds exactly the weights the last step trained
    loaded = {n: p for n, p in AutoPeftModelForCausalLM.from_pretrained(final).named_parameters() if "lora_" in n}
    checkpoint = load_file(str(adapter_off.run_dir / "checkpoints" / "step-00000003" / "trainable.safetensors"))
    trained = {name.removeprefix("model."): tensor for name, tensor in checkpoint.items()}  # the log-prob wrapper's
    assert sorted(loaded) == sorted(trained) and len(trained) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(torch.equal(loaded[name].detach(), tensor) for name, tensor in trained.items())


def test_nonfinite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(base_config, monkeypatch):
    """Poison step 3's loss; the checkpoint of step 2 must remain the latest, intact."""
    from preftune.training import step as step_module

    original = step_module.Scorer.__call__
    calls = {"n": 0}

    def poisoned(self, batch, state=None):
        out, logps = original(self, batch, state)
        if self.policy is not None and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:
                out = type(out)(out.losses * float("nan"), out.chosen_rewards, out.rejected_rewards, out.metrics)
        return out, logps

    monkeypatch.setattr(step_module.Scorer, "__call__", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan.*step-00000002"):
        run(base_config)


def test_bf16_autocast_trains(base_config):
    result = run(base_config, "training.precision=bf16")
    rows = train_rows(result.history)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference in bf16 too
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_sft_on_completions(base_config, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Say:", "completion": f" word {i}"}) + "\n" for i in range(12)))
    raw = copy.deepcopy(base_config)
    raw["data"].update(train_file=str(data), eval_fraction=0.0)
    raw["objective"] = {"name": "sft"}
    raw["training"]["learning_rate"] = 5e-3
    result = train(config_from_dict(raw), command="sft")
    rows = train_rows(result.history)
    # SFT on single completions reports its loss and log-probs, and no reward or accuracy (they would mean nothing)
    assert not [key for key in rows[0] if key.startswith("rewards/")] and rows[0]["logps/chosen"] < 0
    # the mean token NLL of a random 512-way model starts near log 512 = 6.24
    assert 5.0 < rows[0]["loss"] < 7.5


def test_gradient_checkpointing_changes_nothing_but_memory(base_config, tmp_path):
    plain = run(base_config, f"training.output_dir={tmp_path / 'plain'}")
    checkpointed = run(base_config, "model.gradient_checkpointing=true", f"training.output_dir={tmp_path / 'gc'}")
    for x, y in zip(train_rows(plain.history), train_rows(checkpointed.history), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


def test_merged_lora_export_loads_as_a_plain_model(base_config):
    raw = copy.deepcopy(base_config)
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "save": "merged"}
    raw["training"]["learning_rate"] = 1e-2
    result = run(raw)
    final = result.run_dir / "final"
    assert not (final / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_conversational_pairs_train_with_the_chat_template(base_config, tmp_path):
    """Messages are rendered with the tokenizer's ChatML template; the first step is still log 2."""
    data = tmp_path / "chat.jsonl"
    rows = []
    for i in range(12):
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Review movie {i}."}]
        rows.append({"chosen": prompt + [{"role": "assistant", "content": "A delight."}],
                     "rejected": prompt + [{"role": "assistant", "content": f"Dull, number {i}."}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = copy.deepcopy(base_config)
    raw["data"].update(train_file=str(data), eval_fraction=0.0)
    result = run(raw)
    first = train_rows(result.history)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < first["logps/chosen"] - 1.0  # longer rejected


def test_kto_trains_through_a_remainder_micro_batch_of_one(base_config, tmp_path):
    """9 unpaired rows, batch 4: the epoch's third micro-batch holds one example, which has no other completion
    to estimate KTO's reference point from; it trains with the last estimate instead of failing."""
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}", "label": i % 2 == 0}) + "\n"
                            for i in range(9)))
    raw = copy.deepcopy(base_config)
    raw["data"].update(train_file=str(data), eval_fraction=0.0)
    raw["objective"] = {"name": "kto", "beta": 0.1}
    raw["training"].update(max_steps=3, save_steps=None, learning_rate=1e-2)
    rows = train_rows(run(raw).history)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[2]["kl"] == pytest.approx(rows[1]["kl"])  # step 3 (one example) reused step 2's estimate
