"""Examples of any shape -> ``TokenizedExample``s, with a summary of what truncation did.

Every completion of every shape goes through the same rules (``encoder``: boundary, BOS, EOS;
``truncation``: what is cut and what is dropped), in slot order.
"""

from __future__ import annotations

from ..config import DataConfig
from .encoder import Encoder, render_all
from .examples import slot_label, slot_scores
from .fields import DataValidationError
from .report import format_problems
from .tokenized import TokenizedExample
from .truncation import UNITS, TruncationSummary, count, truncate


def _strict_error(summary: TruncationSummary, data: DataConfig) -> DataValidationError:
    lines = [f"{source}: the prompt leaves no room for the completion" for source in summary.dropped]
    header = (
        f"{count(len(summary.dropped), summary.unit)} would lose the whole completion to truncation "
        f"(data.max_length={data.max_length}, data.max_prompt_length={data.max_prompt_length}; "
        "data.strict_truncation is true): raise max_length or set max_prompt_length below it"
    )
    return DataValidationError(format_problems(header, lines, data.max_errors_reported))


def tokenize_examples(examples: list, tokenizer, data: DataConfig) -> tuple[list[TokenizedExample], TruncationSummary]:
    """Token ids for validated examples (one shape per call) and a summary of what truncation did.

    An example that any completion would be emptied from by ``max_length`` is dropped whole (named in the
    summary), or is a ``DataValidationError`` under ``data.strict_truncation``. Ranked completions come
    best first, with their scores.
    """
    tokenized, summary = tokenize_some(examples, Encoder(tokenizer), data)
    check_strict(summary, data)
    return tokenized, summary


def check_strict(summary: TruncationSummary, data: DataConfig) -> None:
    if summary.dropped and data.strict_truncation:
        raise _strict_error(summary, data)


def tokenize_some(examples, encoder: Encoder, data: DataConfig, start: int = 0,
                  indices: list[int] | None = None) -> tuple[list[TokenizedExample], TruncationSummary]:
    """``tokenize_examples`` without the strict check, for examples that are part of a split: ``indices`` (or
    ``start``, ``start + 1``, ...) are their positions in it."""
    tokenizer = encoder.tokenizer
    rendered = render_all(examples, tokenizer, data.max_errors_reported)
    prompt_ids = encoder.encode_prompts([prompt for prompt, _, _ in rendered])
    completion_ids = iter(encoder.encode_completions([text for _, texts, _ in rendered for text in texts]))
    unit = UNITS.get(examples[0].shape, "example") if len(examples) else "example"
    summary = TruncationSummary(len(examples), 0, 0, [], unit, data.max_prompt_length)
    tokenized = []
    for position, (example, (prompt_text, completion_texts, chat)) in enumerate(zip(examples, rendered, strict=True)):
        prompt = encoder.prompt(prompt_ids[position], prompt_text)
        completions = [encoder.completion(next(completion_ids), chat) for _ in completion_texts]
        has_bos = bool(prompt) and prompt[0] == encoder.bos_id
        result = truncate(prompt, completions, has_bos, data)
        if result is None:
            summary.dropped.append(example.source)
            continue
        prompt, completions, prompt_cut, cut = result
        summary.prompts_truncated += prompt_cut
        summary.completions_truncated += cut
        if prompt_cut or cut:
            summary.cut.append((example.source, prompt_cut, cut))
        index = start + position if indices is None else indices[position]
        tokenized.append(TokenizedExample(index, prompt, completions, slot_label(example), slot_scores(example)))
    return tokenized, summary
