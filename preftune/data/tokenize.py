"""Examples -> token ids with an exact prompt/completion boundary, one BOS, an EOS ending every
completion, and truncation that is explicit and reported.

Prompt and completion are tokenized separately and concatenated. Tokenizing ``prompt + completion`` as
one string lets BPE merge across the boundary (``"Hello "`` + ``"world"`` -> ``"Hello"``, ``" world"``),
and then the completion mask would cover a token that is half prompt. Chat rows are rendered with the
tokenizer's template; the completion is the text the template adds after the prompt it renders with
``add_generation_prompt=True``, which is only well defined when that prompt is a prefix of the full text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..config import DataConfig
from .validate import DataValidationError, PairExample, format_problems

_ENCODE_CHUNK = 2048  # texts per tokenizer call: batching is much faster, chunking bounds memory
_SOURCES_SHOWN = 10  # dropped examples named in the one-line summary


@dataclass
class TokenizedExample:
    index: int  # position of the example in its split (as validated, before any drop): a stable cache key
    prompt_ids: list[int]
    chosen_ids: list[int]  # for completions: the completion
    rejected_ids: list[int] | None  # None for completions


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass
class TruncationSummary:
    examples: int  # examples given, dropped ones included
    prompts_truncated: int
    completions_truncated: int
    dropped: list[str]  # sources of dropped examples
    unit: str = "pair"  # "pair" or "example": the word describe() counts in
    max_prompt_length: int | None = None

    def describe(self) -> str:
        """One line for the log, e.g. "tokenized 1000 pairs: 12 prompts truncated to 512 tokens (kept
        their end), 30 completions truncated (kept their start), 2 pairs dropped because ..."."""
        parts = []
        if self.prompts_truncated:
            parts.append(
                f"{_count(self.prompts_truncated, 'prompt')} truncated to {self.max_prompt_length} tokens (kept their end)"
            )
        if self.completions_truncated:
            parts.append(f"{_count(self.completions_truncated, 'completion')} truncated (kept their start)")
        if self.dropped:
            names = ", ".join(self.dropped[:_SOURCES_SHOWN])
            if len(self.dropped) > _SOURCES_SHOWN:
                names += f" and {len(self.dropped) - _SOURCES_SHOWN} more"
            parts.append(f"{_count(len(self.dropped), self.unit)} dropped because a completion would be empty: {names}")
        return f"tokenized {_count(self.examples, self.unit)}: " + (", ".join(parts) or "nothing truncated")


class _Encoder:
    """The tokenizer facts the BOS/EOS rules need, looked up once."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise DataValidationError("the tokenizer has no EOS token; set tokenizer.eos_token (every completion ends with it)")
        self.tokenizer = tokenizer
        self.bos_id, self.bos_token, self.eos_id = tokenizer.bos_token_id, tokenizer.bos_token, tokenizer.eos_token_id
        probe = tokenizer("a", add_special_tokens=True).input_ids
        self.wants_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self._whitespace: dict[int, bool] = {}
        # SentencePiece-style tokenizers (Llama-2, Mistral/Zephyr: Metaspace, prepend_scheme "first") put a
        # "▁" before the first word of every call, so a completion tokenized alone would start with a space
        # the joined text does not have. They prepend nothing right after a special token: such tokenizers
        # get their completions encoded behind an EOS that is then dropped.
        anchored = self._encode([tokenizer.eos_token + "a"])[0]
        self.anchor = anchored[:1] == [self.eos_id] and anchored[1:] != self._encode(["a"])[0]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        ids: list[list[int]] = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            ids += self.tokenizer(texts[start : start + _ENCODE_CHUNK], add_special_tokens=False)["input_ids"]
        return ids

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts)

    def encode_completions(self, texts: list[str]) -> list[list[int]]:
        """Each text tokenized on its own (no merge across the boundary), as it reads after a prompt."""
        if not self.anchor:
            return self._encode(texts)
        return [ids[1:] for ids in self._encode([self.tokenizer.eos_token + text for text in texts])]

    def is_whitespace(self, token_id: int) -> bool:
        if token_id not in self._whitespace:
            self._whitespace[token_id] = not self.tokenizer.decode([token_id]).strip()
        return self._whitespace[token_id]

    def prompt(self, ids: list[int], text: str) -> list[int]:
        """Exactly one BOS, at position 0, when the tokenizer adds one or the rendered text starts with it:
        a template that writes {{ bos_token }} plus a tokenizer that adds BOS would otherwise give two."""
        start = 0
        while start < len(ids) and ids[start] == self.bos_id:
            start += 1
        bos_in_text = self.bos_token is not None and text.startswith(self.bos_token)
        return ([self.bos_id] if self.wants_bos or bos_in_text else []) + ids[start:]

    def completion(self, ids: list[int], chat: bool) -> list[int]:
        """EOS ends every completion, once: generation stops at EOS, so that is where the model learns to stop."""
        if chat:  # templates close a turn with e.g. "<|im_end|>\n": keep up to the EOS, the newline is never generated
            end = len(ids)
            while end > 0 and ids[end - 1] != self.eos_id and self.is_whitespace(ids[end - 1]):
                end -= 1
            if end > 0 and ids[end - 1] == self.eos_id:
                return ids[:end]
        elif ids and ids[-1] == self.eos_id:
            return ids
        return ids + [self.eos_id]


def _completions(example) -> list:
    return [example.chosen, example.rejected] if isinstance(example, PairExample) else [example.completion]


def _mismatch(prompt_text: str, full_text: str) -> str:
    at = 0
    while at < min(len(prompt_text), len(full_text)) and prompt_text[at] == full_text[at]:
        at += 1
    return (
        "the chat template renders the prompt differently once a completion follows it, so the prompt's text "
        f"is not a prefix of the conversation's and the completion boundary is undefined (at character {at} the "
        f"prompt has {prompt_text[at:at + 30]!r}, the conversation {full_text[at:at + 30]!r})"
    )


def _render_chat(tokenizer, example) -> tuple[str, list[str]]:
    """(prompt text, completion texts) from the template; raises ValueError naming what went wrong."""
    try:
        prompt_text = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
        fulls = [tokenizer.apply_chat_template(example.prompt + c, tokenize=False) for c in _completions(example)]
    except Exception as exc:  # jinja errors (raise_exception in templates) have no common base with ValueError
        raise ValueError(f"the chat template failed: {exc}") from exc
    for full in fulls:
        if not full.startswith(prompt_text):
            raise ValueError(_mismatch(prompt_text, full))
    return prompt_text, [full[len(prompt_text) :] for full in fulls]


def _render_all(examples: list, tokenizer, limit: int) -> list[tuple[str, list[str], bool]]:
    chats = [e for e in examples if isinstance(e.prompt, list)]
    if chats and not getattr(tokenizer, "chat_template", None):
        raise DataValidationError(
            f"{len(chats)} examples are conversations (first: {chats[0].source}) but the tokenizer has no chat "
            "template; set tokenizer.chat_template, or give the data as text"
        )
    rendered, problems = [], []
    for example in examples:
        if isinstance(example.prompt, str):
            rendered.append((example.prompt, _completions(example), False))
            continue
        try:
            rendered.append((*_render_chat(tokenizer, example), True))
        except ValueError as exc:
            problems.append(f"{example.source}: {exc}")
    if problems:
        raise DataValidationError(format_problems(f"{len(problems)} examples cannot be tokenized:", problems, limit))
    return rendered


def _truncate(prompt: list[int], completions: list[list[int]], has_bos: bool, data: DataConfig):
    """(prompt, completions, prompt was cut, number of completions cut), or None when a completion
    would be left with no token. The prompt keeps its end (the question sits there), after its BOS."""
    prompt_cut = data.max_prompt_length is not None and len(prompt) > data.max_prompt_length
    if prompt_cut:
        bos = prompt[:1] if has_bos else []
        keep = data.max_prompt_length - len(bos)
        prompt = bos + prompt[len(prompt) - keep :]
    if data.max_length is None:
        return prompt, completions, prompt_cut, 0
    room = data.max_length - len(prompt)
    if room <= 0:
        return None
    cut = sum(len(c) > room for c in completions)
    return prompt, [c[:room] for c in completions], prompt_cut, cut


def tokenize_examples(examples: list, tokenizer, data: DataConfig) -> tuple[list[TokenizedExample], TruncationSummary]:
    """Token ids for ``PairExample``s or ``CompletionExample``s and a summary of what truncation did.

    A pair whose completion would be emptied by ``max_length`` is dropped (named in the summary), or is
    a ``DataValidationError`` under ``data.strict_truncation``.
    """
    encoder = _Encoder(tokenizer)
    rendered = _render_all(examples, tokenizer, data.max_errors_reported)
    prompt_ids = encoder.encode_prompts([prompt for prompt, _, _ in rendered])
    completion_ids = iter(encoder.encode_completions([text for _, texts, _ in rendered for text in texts]))
    paired = bool(examples) and isinstance(examples[0], PairExample)
    summary = TruncationSummary(len(examples), 0, 0, [], "pair" if paired else "example", data.max_prompt_length)
    tokenized = []
    for index, (example, (prompt_text, completion_texts, chat)) in enumerate(zip(examples, rendered, strict=True)):
        prompt = encoder.prompt(prompt_ids[index], prompt_text)
        completions = [encoder.completion(next(completion_ids), chat) for _ in completion_texts]
        has_bos = bool(prompt) and prompt[0] == encoder.bos_id
        result = _truncate(prompt, completions, has_bos, data)
        if result is None:
            summary.dropped.append(example.source)
            continue
        prompt, completions, prompt_cut, cut = result
        summary.prompts_truncated += prompt_cut
        summary.completions_truncated += cut
        rejected = completions[1] if len(completions) > 1 else None
        tokenized.append(TokenizedExample(index, prompt, completions[0], rejected))
    if summary.dropped and data.strict_truncation:
        lines = [f"{source}: the prompt leaves no room for the completion" for source in summary.dropped]
        header = (
            f"{_count(len(summary.dropped), summary.unit)} would lose the whole completion to truncation "
            f"(data.max_length={data.max_length}, data.max_prompt_length={data.max_prompt_length}; "
            "data.strict_truncation is true): raise max_length or set max_prompt_length below it"
        )
        raise DataValidationError(format_problems(header, lines, data.max_errors_reported))
    return tokenized, summary


def content_hash(tokenized: list[TokenizedExample]) -> str:
    """sha256 hex over every index and id: the key of cached reference log-probs for exactly this data."""
    digest = hashlib.sha256(b"preftune-tokenized-v1")
    for example in tokenized:
        rejected = example.rejected_ids
        lengths = [example.index, len(example.prompt_ids), len(example.chosen_ids), -1 if rejected is None else len(rejected)]
        digest.update(np.asarray(lengths, dtype="<i8").tobytes())  # lengths first: ([1], [2 3]) != ([1 2], [3])
        for ids in (example.prompt_ids, example.chosen_ids, rejected or []):
            digest.update(np.asarray(ids, dtype="<i8").tobytes())
    return digest.hexdigest()
