"""Training procedures: TR-DPO reference updates and sDPO stages."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune.config import ConfigError, config_from_dict
from preftune.training import train


def run(raw: dict, *overrides: str):
    return train(config_from_dict(copy.deepcopy(raw), list(overrides)))


def losses(result) -> list[float]:
    return [row["loss"] for row in result.history if "loss" in row]


@pytest.mark.parametrize("lora", [False, True], ids=["frozen-copy", "lora-adapter"])
def test_hard_sync_makes_the_next_step_start_from_log_2(base_config, tmp_path, lora):
    """TR-DPO with α = 1 every 2 steps: after the sync at step 2 the reference equals the policy, so step 3's
    DPO loss is exactly log 2 again (every log-ratio is 0), while step 2's was not."""
    raw = copy.deepcopy(base_config)
    raw["training"].update(max_steps=4, learning_rate=1e-2, save_steps=None)
    raw["reference"].update(sync_steps=2, sync_alpha=1.0)
    if lora:
        raw["lora"] = {"enabled": True, "r": 4, "alpha": 8}
        raw["training"]["learning_rate"] = 5e-2
    result = run(raw)
    curve = losses(result)
    assert curve[0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(curve[1] - math.log(2)) > 1e-4
    assert curve[2] == pytest.approx(math.log(2), abs=1e-6)
    log_text = (result.run_dir / "train.log").read_text()
    assert "reference synced with the policy after step 2 (alpha=1, sync 1)" in log_text
    assert "reference synced with the policy after step 4 (alpha=1, sync 2)" in log_text


def test_soft_sync_mixes_policy_into_reference(base_config, tiny_model_dir, tmp_path):
    """α = 0.25 at step 2: θ_ref = 0.25·θ_2 + 0.75·θ_0, checked on the checkpointed tensors."""
    raw = copy.deepcopy(base_config)
    raw["training"].update(max_steps=2, learning_rate=1e-2, save_steps=2, eval_before_training=False)
    raw["reference"].update(sync_steps=2, sync_alpha=0.25)
    result = run(raw)
    checkpoint = result.run_dir / "checkpoints" / "step-00000002"
    policy = load_file(str(checkpoint / "trainable.safetensors"))
    saved = load_file(str(checkpoint / "objective_state.safetensors"))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = 0.25 * policy[f"model.{name}"] + 0.75 * start[name]
    torch.testing.assert_close(saved[f"reference/{name}"], expected, rtol=1e-6, atol=1e-7)


def test_sync_resumes_exactly(base_config, tmp_path, monkeypatch):
    """The reference moved during training; a run crashed after the step-4 checkpoint resumes with it."""
    raw = copy.deepcopy(base_config)
    raw["training"].update(max_steps=6, save_steps=4, learning_rate=1e-2, save_total_limit=None)
    raw["reference"].update(sync_steps=3, sync_alpha=0.5)
    straight = run(raw, f"training.output_dir={tmp_path / 'a'}")
    from preftune.training import loop as trainer_module

    original = trainer_module.Loop._optimizer_step

    def crash(self, step, stats):
        if step == 4:
            raise RuntimeError("simulated crash")
        return original(self, step, stats)

    monkeypatch.setattr(trainer_module.Loop, "_optimizer_step", crash)
    with pytest.raises(RuntimeError):
        run(raw, f"training.output_dir={tmp_path / 'b'}")
    monkeypatch.setattr(trainer_module.Loop, "_optimizer_step", original)
    resumed = run(raw, f"training.output_dir={tmp_path / 'b'}")
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)


def test_sync_refuses_a_precomputed_reference(base_config):
    raw = copy.deepcopy(base_config)
    raw["reference"].update(sync_steps=2, precompute=True)
    with pytest.raises(ConfigError, match="reference.sync_steps .* cannot be precomputed"):
        config_from_dict(raw)


def test_sdpo_stages_chain_policy_and_reference(base_config, tmp_path):
    """2 stages over 18 training pairs (9 each): stage 2 starts from stage 1's final model, and since the
    reference is a copy of that start, stage 2's first loss is exactly log 2 again."""
    raw = copy.deepcopy(base_config)
    raw["training"].update(stages=2, max_steps=2, learning_rate=1e-2, save_steps=None)
    result = run(raw)
    root = tmp_path / "run"
    assert result.run_dir == root / "stage-2"
    stage2 = config_from_dict(__import__("yaml").safe_load((root / "stage-2" / "config.yaml").read_text()))
    assert stage2.model.name_or_path == str(root / "stage-1" / "final")
    assert stage2.reference.name_or_path is None
    for t in (1, 2):
        rows = [r for r in (root / f"stage-{t}" / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
        assert __import__("json").loads(rows[0])["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert len((root / "stages" / "stage-1.jsonl").read_text().splitlines()) == 9
    assert len((root / "stages" / "stage-2.jsonl").read_text().splitlines()) == 9
    # stage 1's final weights are stage 2's starting point: its first logged logps equal stage 1's final model's
    stage1_final = AutoModelForCausalLM.from_pretrained(root / "stage-1" / "final").state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "stage-2" / "final").state_dict()
    assert not torch.equal(stage1_final[name], start[name])  # stage 2 trained further
    log_text = (root / "train.log").read_text()
    assert "sDPO stage 2/2: policy and reference start from" in log_text


def test_sdpo_stages_given_as_files_train_one_run_per_file(base_config, pairs_file, tmp_path):
    """`training.stages: [a.jsonl, b.jsonl]`: stage t trains on file t (split by the recipe's eval_fraction, 25%
    of 12 rows = 3 held out, 9 trained), stage 2 starts from stage 1's final model; a bad row in the second file
    fails before any model loads, naming it."""
    import json

    rows = pairs_file.read_text().splitlines()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(rows[:12]) + "\n")
    second.write_text("\n".join(rows[12:]) + "\n")
    raw = copy.deepcopy(base_config)
    raw["training"].update(stages=[str(first), str(second)], max_steps=1, save_steps=None, eval_before_training=False)
    result = run(raw)
    root = tmp_path / "run"
    assert result.run_dir == root / "stage-2"
    stage2 = config_from_dict(__import__("yaml").safe_load((root / "stage-2" / "config.yaml").read_text()))
    assert (stage2.data.train_file, stage2.model.name_or_path) == (str(second), str(root / "stage-1" / "final"))
    card = (root / "stage-1" / "final" / "README.md").read_text()
    assert "(9 examples after validation and truncation)" in card and "held-out: 3 examples" in card
    second.write_text(rows[12] + "\n" + json.dumps({"prompt": "x", "chosen": "", "rejected": "y"}) + "\n")
    from preftune.data import DataValidationError

    with pytest.raises(DataValidationError, match=r"b.jsonl:2: field 'chosen'"):
        run(raw, f"training.output_dir={tmp_path / 'again'}")
    assert not (tmp_path / "again" / "stage-1").exists()


def test_sdpo_rerun_skips_finished_stages(base_config, tmp_path):
    raw = copy.deepcopy(base_config)
    raw["training"].update(stages=2, max_steps=1, save_steps=None, eval_before_training=False)
    run(raw)
    again = run(raw)  # nothing left to train: the last stage's result is read back
    assert again.final_dir == tmp_path / "run" / "stage-2" / "final" and not again.interrupted
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert "sDPO stage 1/2 already finished" in log_text and "sDPO stage 2/2 already finished" in log_text


def test_npo_with_a_retain_set(base_config, tiny_model_dir, tmp_path):
    """NPO on negatives + λ·NLL on a retain set of exactly one batch (4 examples): step 1's retain/nll must be
    the mean over the 4 examples of their mean token NLL under the untouched model (full-logits second
    implementation), and the term must change the update (weights differ from λ = 0)."""
    import json

    from transformers import AutoTokenizer

    from preftune.data import Collator, load_examples, tokenize_examples

    negatives = tmp_path / "forget.jsonl"
    negatives.write_text("".join(json.dumps({"prompt": "Say:", "rejected": f" bad words {i}"}) + "\n" for i in range(8)))
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"prompt": "Say:", "completion": f" kind words {i}"}) + "\n" for i in range(4)))
    raw = copy.deepcopy(base_config)
    raw["data"].update(train_file=str(negatives), eval_fraction=0.0, retain_file=str(retain))
    raw["objective"] = {"name": "npo", "beta": 0.1, "retain_weight": 1.0}
    raw["training"].update(max_steps=2, save_steps=None, learning_rate=1e-2)
    with_retain = run(raw, f"training.output_dir={tmp_path / 'a'}")
    without = run(raw, "objective.retain_weight=0.0", f"training.output_dir={tmp_path / 'b'}")

    config = config_from_dict(copy.deepcopy(raw))
    config.data.train_file = str(retain)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples, _ = tokenize_examples(load_examples(config.data, ("completions",)).train, tokenizer, config.data)
    batch = Collator(tokenizer.pad_token_id, "completions")(examples)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logprobs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    target = logprobs[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:]
    expected = (-(target * mask).sum(1) / mask.sum(1)).mean().item()
    first = [r for r in with_retain.history if "loss" in r][0]
    assert first["retain/nll"] == pytest.approx(expected, abs=1e-5)
    assert first["loss"] == pytest.approx([r for r in without.history if "loss" in r][0]["loss"], abs=1e-7)
    a = load_file(str(with_retain.run_dir / "final" / "model.safetensors"))
    b = load_file(str(without.run_dir / "final" / "model.safetensors"))
    assert any(not torch.allclose(a[k], b[k]) for k in a)
