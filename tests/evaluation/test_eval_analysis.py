"""Evaluation analysis: Spearman's ρ on hand-ranked data, length statistics, and the SimPO likelihood–length
analysis that `preftune eval` adds, checked against log-probs computed from full logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from preftune.config import config_from_dict
from preftune.data import load_examples, tokenize_examples
from preftune.evaluation.analysis.lengths import describe, length_stats
from preftune.evaluation.analysis.likelihood_length import likelihood_length_metrics
from preftune.evaluation.analysis.spearman import average_ranks, spearman


def test_spearman_on_hand_ranked_examples():
    """No ties: x ranks 1..5, y = [2, 1, 4, 3, 5] -> d = [-1, 1, -1, 1, 0], Σd² = 4,
    ρ = 1 - 6·4 / (5·24) = 0.8. Ties: y = [5, 6, 7, 8, 7] ranks [1, 2, 3.5, 5, 3.5]; centred ranks
    x [-2, -1, 0, 1, 2], y [-2, -1, 0.5, 2, 0.5]: ρ = 8 / sqrt(10 · 9.5) = 0.820783."""
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert average_ranks([10, 20, 20]).tolist() == [1.0, 2.5, 2.5]
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4])) and math.isnan(spearman([1], [2]))


def test_length_statistics_by_hand():
    """Values 1, 2, 2, 3, 10: mean 18 / 5 = 3.6, median 2, p90 at position 0.9 · 4 = 3.6 -> 3 + 0.6 · 7 = 7.2."""
    assert describe([3, 1, 10, 2, 2], "x/") == pytest.approx({"x/mean": 3.6, "x/median": 2.0, "x/p90": 7.2})
    assert describe([], "x/") == {}
    stats = length_stats(["ab", "abcd"])
    assert stats == {"completions": 2.0, "chars/mean": 3.0, "chars/median": 3.0, "chars/p90": pytest.approx(3.8)}


def test_likelihood_length_metrics_from_recorded_batches():
    """Two batches of pairs ([chosen.., rejected..] rows): sums / counts give average log-likelihoods
    -1, -0.5, -2, -0.25 for lengths 2, 4, 1, 8 -> the longer, the likelier: ρ = 1."""
    batches = [(torch.tensor([-2.0, -2.0]), torch.tensor([2.0, 4.0])),  # chosen -1 (2 tokens), rejected -0.5 (4)
               (torch.tensor([-2.0, -2.0]), torch.tensor([1.0, 8.0]))]  # chosen -2 (1), rejected -0.25 (8)
    metrics = likelihood_length_metrics(batches)
    assert metrics["eval/analysis/avg_logp_length_spearman"] == pytest.approx(1.0)
    assert metrics["eval/analysis/tokens_chosen_mean"] == 1.5 and metrics["eval/analysis/tokens_rejected_mean"] == 6.0
    assert metrics["eval/analysis/completions"] == 4.0
    assert likelihood_length_metrics([]) == {}


def test_preftune_eval_adds_the_simpo_analysis(base_config, tiny_model_dir, other_model_dir):
    """Independently: tokenize the held-out pairs, score every completion from the model's full logits,
    then rank-correlate average log-likelihood with length. (A full model needs a reference to be named.)"""
    from transformers import AutoModelForCausalLM

    from preftune import modeling
    from preftune.evaluation.heldout import evaluate_model

    base_config["reference"]["name_or_path"] = str(other_model_dir)
    config = config_from_dict(base_config)
    metrics = evaluate_model(config)
    from preftune.evaluation.heldout import report_path

    written = json.loads(report_path(config).read_text())
    assert written["eval/analysis/avg_logp_length_spearman"] == metrics["eval/analysis/avg_logp_length_spearman"]
    held_out = load_examples(config.data, "pairs", seed=config.training.seed).eval
    tokenized, _ = tokenize_examples(held_out, modeling.load_tokenizer(str(tiny_model_dir)), config.data)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    averages, lengths = [], []
    for example in tokenized:
        for completion in example.completions:
            ids = torch.tensor([example.prompt_ids + completion])
            with torch.no_grad():
                logprobs = model(ids).logits[0].float().log_softmax(-1)
            start = len(example.prompt_ids)
            total = sum(float(logprobs[start + k - 1, t]) for k, t in enumerate(completion))
            averages.append(total / len(completion))
            lengths.append(len(completion))
    assert metrics["eval/analysis/completions"] == len(averages) == 2 * len(tokenized)
    assert metrics["eval/analysis/avg_logp_length_spearman"] == pytest.approx(spearman(averages, lengths), abs=1e-6)
    chosen = [len(e.completions[0]) for e in tokenized]
    assert metrics["eval/analysis/tokens_chosen_mean"] == pytest.approx(sum(chosen) / len(chosen))
    assert "eval/rewards/accuracies" in metrics  # reward accuracy, as before
