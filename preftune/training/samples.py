"""What the model says, not only numbers: at every evaluation, greedy completions of a few fixed prompts
(the first ``training.sample_prompts`` of the held-out split, or of the train split when there is none),
written to ``samples.jsonl`` and to the trackers by the metrics writer.

The prompts are the token ids training sees (chat template, generation header, truncation), and generation
goes through the same sampler as ``preftune generate`` (left padding, the model's own end-of-turn tokens).
"""

from __future__ import annotations

import logging

import torch

from ..data import TokenizedExample, TokenizedSplits
from ..feedback.sampling import HFSampler, SamplingConfig

log = logging.getLogger("preftune")


def sample_prompts(data: TokenizedSplits, count: int) -> tuple[str, list[TokenizedExample]]:
    """(split name, its first ``count`` examples): held-out prompts, or train prompts when none are held out."""
    split, examples = ("eval", data.eval) if len(data.eval) else ("train", data.train)
    if count and split == "train":
        log.warning("training.sample_prompts: no held-out split, so the samples continue %d training prompts",
                    min(count, len(examples)))
    return split, [examples[i] for i in range(min(count, len(examples)))]


@torch.no_grad()
def generate_samples(model: torch.nn.Module, tokenizer, split: str, examples: list[TokenizedExample],
                     max_new_tokens: int) -> list[dict]:
    """One greedy completion per example: ``{index, split, prompt, completion}`` (the prompt decoded as the
    model reads it, special tokens included). The model is put back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        sampler = HFSampler(model, tokenizer, SamplingConfig(num_samples=1, max_new_tokens=max_new_tokens,
                                                             temperature=0.0))
        texts = sampler.sample([e.prompt_ids for e in examples], [e.index for e in examples])
    finally:
        model.train(was_training)
    return [{"index": e.index, "split": split, "prompt": tokenizer.decode(e.prompt_ids), "completion": text[0]}
            for e, text in zip(examples, texts, strict=True)]
