"""Log-probs computed the plain way, to check what a run's reference computed: one example at a time,
the model's full logits, log-softmax in fp32, the completion tokens' log-probs summed (no chunking, no
batching, no padding: none of preftune's log-prob code)."""

from __future__ import annotations

import statistics

import torch

from preftune import modeling
from preftune.data import load_examples, tokenize_examples


def heldout_pairs(config):
    """The held-out pairs of ``config`` (its seed decides the split), tokenized as training tokenizes them."""
    held_out = load_examples(config.data, "pairs", seed=config.training.seed).eval
    tokenizer = modeling.load_tokenizer(config.model.name_or_path)
    return tokenize_examples(held_out, tokenizer, config.data)[0]


@torch.no_grad()
def completion_sum(model, prompt_ids: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt_ids + completion], device=next(model.parameters()).device)
    logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    start = len(prompt_ids)  # token start + k is predicted at position start + k - 1
    return sum(float(logprobs[start + k - 1, token]) for k, token in enumerate(completion))


def mean_sums(model, examples) -> tuple[float, float]:
    """(mean chosen, mean rejected) summed completion log-probs over ``examples``: what a run logs as
    ``eval/logps/chosen`` and ``eval/logps/rejected`` for its policy."""
    model.eval()
    chosen = [completion_sum(model, e.prompt_ids, e.completions[0]) for e in examples]
    rejected = [completion_sum(model, e.prompt_ids, e.completions[1]) for e in examples]
    return statistics.fmean(chosen), statistics.fmean(rejected)


def reference_means(metrics: dict, beta: float) -> tuple[float, float]:
    """The reference's mean log-probs recovered from a DPO run's eval metrics: rewards = β·(π - π_ref),
    so π_ref = logps - rewards / β, and means of both sides commute with it."""
    return (metrics["eval/logps/chosen"] - metrics["eval/rewards/chosen"] / beta,
            metrics["eval/logps/rejected"] - metrics["eval/rewards/rejected"] / beta)
