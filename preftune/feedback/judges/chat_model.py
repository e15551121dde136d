"""A local chat model as a pairwise judge, asked "which response is better, A or B?" in both orders.

Language-model judges prefer whichever answer is shown first (or second) regardless of content (Zheng et
al. 2023, "Judging LLM-as-a-Judge", section 3.3). Asking twice with the responses swapped cancels that
bias: with ``p_ab`` = P("A") when ``a`` is shown as A, and ``p_ba`` = P("A") when ``b`` is shown as A,

    P(a better than b) = (p_ab + (1 - p_ba)) / 2

where P("A") = softmax over the logits of the two answer tokens, taken at the first token of the reply.
The formula is antisymmetric, so ``compare(a, b) + compare(b, a) == 1``; the code below makes that hold
exactly in floating point too (see ``_both_orders``), so a win rate does not depend on argument order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ... import modeling
from ...config import ConfigError, ModelConfig
from . import Judge, Prompt, check_lengths, render_prompt
from .templates import PAIRWISE_TEMPLATE, check_template

TRUST_KEY = "judge.model.trust_remote_code"


@dataclass
class ChatModelJudgeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # judge.model.name_or_path, judge.model.dtype
    template: str = PAIRWISE_TEMPLATE  # {prompt}, {first} (shown as A), {second} (shown as B)
    batch_size: int = 4  # pairs per forward pass (each pair is two sequences, one per order)
    answer_tokens: list[str] = field(default_factory=lambda: ["A", "B"])  # what the reply starts with


class ChatModelJudge(Judge):
    Config = ChatModelJudgeConfig

    def __init__(self, config: ChatModelJudgeConfig):
        super().__init__()
        if not config.model.name_or_path:
            raise ConfigError("config key 'judge.model.name_or_path': the chat model to ask is not set")
        check_template(config.template, "pairwise", "judge.template")
        if config.batch_size <= 0:
            raise ConfigError(f"config key 'judge.batch_size': must be > 0, got {config.batch_size}")
        if len(config.answer_tokens) != 2:
            raise ConfigError(f"config key 'judge.answer_tokens': expected two strings, got {config.answer_tokens}")
        self.config = config
        self.tokenizer = modeling.load_tokenizer(config.model.name_or_path, config.model.trust_remote_code, TRUST_KEY)
        if not self.tokenizer.chat_template:
            raise ConfigError(f"judge.model {config.model.name_or_path} has no chat template; a chat model is needed")
        self.tokenizer.padding_side = "left"  # the answer's logits are then at position -1 of every row
        self.answer_ids = self._answer_ids(config.answer_tokens)
        self.model = modeling.load_frozen(config.model.name_or_path, config.model, TRUST_KEY)

    def _answer_ids(self, answers: list[str]) -> list[int]:
        # the first token of each answer; the chat template ends with the assistant header, so the reply's
        # first token carries no leading space
        ids = [self.tokenizer.encode(a, add_special_tokens=False)[0] for a in answers]
        if ids[0] == ids[1]:
            raise ConfigError(f"config key 'judge.answer_tokens': {answers} start with the same token")
        return ids

    def _render(self, prompt: Prompt, first: str, second: str) -> str:
        text = self.config.template.format(prompt=render_prompt(prompt), first=first, second=second)
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )

    @torch.no_grad()
    def prob_first_answer(self, texts: list[str]) -> torch.Tensor:
        """P(answer A) vs answer B at the first reply token of each rendered text, as float64 ``(N,)``."""
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        mask = enc["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's tokens start at position 0
        # logits_to_keep=1: only the last position is projected to the vocabulary, not (N, T, V)
        logits = self.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions,
                            logits_to_keep=1).logits
        pair = logits[:, -1, self.answer_ids].float()
        return torch.softmax(pair, dim=-1)[:, 0].double()

    def _both_orders(self, prompts: Sequence[Prompt], firsts: Sequence[str], seconds: Sequence[str]) -> list[float]:
        # Each pair is put in a canonical order (x, y) with x <= y, so compare(a, b) and compare(b, a) run the
        # very same forward pass and read the same two probabilities. With s = p_xy - p_yx, the favoured
        # side's probability is v = 0.5 + |s|/2 >= 0.5 (the formula in the module docstring), and 1 - v is
        # exact for v in [0.5, 1] (Sterbenz lemma), so the two calls return v and 1 - v: exactly 1 in sum.
        canonical = [(p, f, s) if f <= s else (p, s, f) for p, f, s in zip(prompts, firsts, seconds, strict=True)]
        texts = [self._render(p, x, y) for p, x, y in canonical] + [self._render(p, y, x) for p, x, y in canonical]
        p_a = self.prob_first_answer(texts).tolist()
        n = len(canonical)
        results = []
        for i, (_, x, _) in enumerate(canonical):
            s = p_a[i] - p_a[n + i]
            v = 0.5 + abs(s) / 2
            favoured_is_x = s >= 0
            first_is_x = firsts[i] == x
            results.append(v if favoured_is_x == first_is_x else 1.0 - v)
        return results

    def compare(self, prompts: Sequence[Prompt], firsts: Sequence[str], seconds: Sequence[str]) -> list[float | None]:
        check_lengths(prompts, firsts, seconds)
        size = self.config.batch_size
        results: list[float | None] = []
        for start in range(0, len(firsts), size):
            end = start + size
            results += self._both_orders(prompts[start:end], firsts[start:end], seconds[start:end])
        return self.tally(results)
