"""preftune and TRL's DPOTrainer compute the same first training step (a second, independent implementation).

Both train the same tiny Llama on the same text pairs against the same reference, which differs from the
policy (another seed), so the step-1 loss is not the trivial log 2 and every log-prob matters. All pairs
form one batch, so TRL's shuffled dataloader draws exactly what preftune draws. Step-1 metrics come from
the forward before the first update, so the learning rate plays no part.

Tokenization: TRL appends the EOS token *string* to text completions and tokenizes ``prompt`` and
``prompt + completion`` (each with the tokenizer's BOS); preftune tokenizes prompt and completion apart
and adds one BOS and the EOS id. The ids agree when BPE cannot merge across the boundary, hence prompts
ending in ":" and completions starting with a space; the test checks the ids before comparing numbers.
"""

from __future__ import annotations

import json

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from preftune.config import config_from_dict  # noqa: E402
from preftune.data import load_examples, tokenize_examples  # noqa: E402
from preftune.training import train  # noqa: E402

from conftest import snippets  # noqa: E402

N_PAIRS = 8
BETA = 0.2
MAX_LENGTH = 96
COMPARED = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")
PROMPTS = ("Write a movie review:", "Review this film:", "Your opinion of the movie:")


@pytest.fixture(scope="module")
def parity_pairs(tmp_path_factory):
    good, bad = snippets(2.0, limit=N_PAIRS), snippets(at_most=-2.0, limit=N_PAIRS)
    rows = [{"prompt": PROMPTS[i % 3], "chosen": " " + good[i], "rejected": " " + bad[i]} for i in range(N_PAIRS)]
    path = tmp_path_factory.mktemp("parity") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows, path


def _preftune_first_step(model_dir, ref_dir, pairs_file, out_dir) -> dict:
    config = config_from_dict({
        "model": {"name_or_path": str(model_dir)},
        "reference": {"name_or_path": str(ref_dir), "cache_dir": str(out_dir / "refcache")},
        "data": {"train_file": str(pairs_file), "max_length": MAX_LENGTH, "max_prompt_length": 32},
        "objective": {"name": "dpo", "beta": BETA},
        "training": {"output_dir": str(out_dir / "run"), "batch_size": N_PAIRS, "max_steps": 1,
                     "learning_rate": 1e-3, "logging_steps": 1, "save_steps": None, "progress_bar": False,
                     "tensorboard": False, "precision": "fp32"},
    })
    result = train(config)
    (row,) = [r for r in result.history if r.get("step") == 1 and "loss" in r]
    return row


class _FirstLog(TrainerCallback):
    """Keeps the first training log (step 1 with logging_steps=1)."""

    def __init__(self):
        self.logs = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.logs is None and logs and "loss" in logs:
            self.logs = dict(logs)


def _trl_trainer(model_dir, ref_dir, rows, out_dir):
    args = trl.DPOConfig(
        output_dir=str(out_dir / "trl"), per_device_train_batch_size=N_PAIRS, max_steps=1, logging_steps=1,
        learning_rate=1e-3, beta=BETA, max_length=MAX_LENGTH, report_to="none", save_strategy="no",
        # TRL defaults to bf16 and gradient checkpointing; the comparison is in fp32 and needs neither.
        bf16=False, gradient_checkpointing=False, use_cpu=True, disable_dropout=True, seed=0,
        dataloader_num_workers=0,
    )
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    callback = _FirstLog()
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[callback])
    return trainer, callback


def test_first_step_metrics_match_trl(tiny_model_dir, other_model_dir, parity_pairs, tmp_path):
    rows, pairs_file = parity_pairs
    trainer, callback = _trl_trainer(tiny_model_dir, other_model_dir, rows, tmp_path)

    # Same token ids first: otherwise a mismatch below would be a tokenization difference, not a math one.
    config = config_from_dict({"model": {"name_or_path": str(tiny_model_dir)},
                               "data": {"train_file": str(pairs_file), "max_length": MAX_LENGTH}})
    ours, _ = tokenize_examples(load_examples(config.data, "pairs").train,
                                AutoTokenizer.from_pretrained(tiny_model_dir), config.data)
    theirs = trainer.train_dataset
    for mine, trl_row in zip(ours, theirs, strict=True):
        assert mine.prompt_ids == trl_row["prompt_ids"]
        assert mine.chosen_ids == trl_row["chosen_ids"]
        assert mine.rejected_ids == trl_row["rejected_ids"]

    trainer.train()
    expected = callback.logs
    got = _preftune_first_step(tiny_model_dir, other_model_dir, pairs_file, tmp_path)
    # Not the trivial values: the reference differs from the policy.
    assert abs(expected["loss"] - 0.6931472) > 1e-3
    for key in COMPARED:
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-4), key
