"""Text and conversations -> token ids: one BOS, an EOS ending every completion, and a prompt/completion
boundary that is exact.

Prompt and completion are tokenized separately and concatenated. Tokenizing ``prompt + completion`` as
one string lets BPE merge across the boundary (``"Hello "`` + ``"world"`` -> ``"Hello"``, ``" world"``),
and then the completion mask would cover a token that is half prompt. Chat rows are rendered with the
tokenizer's template; the completion is the text the template adds after the prompt it renders with
``add_generation_prompt=True``, which is only well defined when that prompt is a prefix of the full text.
"""

from __future__ import annotations

from .fields import DataValidationError
from .report import format_problems

_ENCODE_CHUNK = 2048  # texts per tokenizer call: batching is much faster, chunking bounds memory


class Encoder:
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
        fulls = [tokenizer.apply_chat_template(example.prompt + c, tokenize=False) for c in example.slots]
    except Exception as exc:  # jinja errors (raise_exception in templates) have no common base with ValueError
        raise ValueError(f"the chat template failed: {exc}") from exc
    for full in fulls:
        if not full.startswith(prompt_text):
            raise ValueError(_mismatch(prompt_text, full))
    return prompt_text, [full[len(prompt_text) :] for full in fulls]


def render_all(examples: list, tokenizer, limit: int) -> list[tuple[str, list[str], bool]]:
    """(prompt text, completion texts in slot order, whether it is a conversation) for every example; all
    the examples the template cannot render are reported together."""
    chats = [e for e in examples if isinstance(e.prompt, list)]
    if chats and not getattr(tokenizer, "chat_template", None):
        raise DataValidationError(
            f"{len(chats)} examples are conversations (first: {chats[0].source}) but the tokenizer has no chat "
            "template; set tokenizer.chat_template, or give the data as text"
        )
    rendered, problems = [], []
    for example in examples:
        if isinstance(example.prompt, str):
            rendered.append((example.prompt, list(example.slots), False))
            continue
        try:
            rendered.append((*_render_chat(tokenizer, example), True))
        except ValueError as exc:
            problems.append(f"{example.source}: {exc}")
    if problems:
        raise DataValidationError(format_problems(f"{len(problems)} examples cannot be tokenized:", problems, limit))
    return rendered
