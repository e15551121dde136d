"""Tokenizing the shapes that are not pairs: slot order (ranked best first, rejected before samples), labels
and scores carried along, whole-example drops, and a content hash that sees every completion, label, score.

Word-level tokenizer with readable ids: p1 -> 11, c1 -> 21, r1 -> 31, <s> -> 0, </s> -> 1.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from preftune.config import DataConfig
from preftune.data import (
    DataValidationError,
    NegativesWithSamplesExample,
    PairExample,
    RankedExample,
    ScoredExample,
    TokenizedExample,
    UnpairedExample,
    content_hash,
    tokenize_examples,
)
from preftune.testing import tiny_tokenizer

NO_LIMITS = DataConfig(max_length=None, max_prompt_length=None)


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3}
    for i in range(1, 10):
        vocab.update({f"p{i}": 10 + i, f"c{i}": 20 + i, f"r{i}": 30 + i})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_ranked_completions_best_first_with_their_scores(words):
    example = RankedExample("f:1", "p1", ["c1", "c2 c3", "c4"], [1.0, 3.0, 2.0])
    tokenized, _ = tokenize_examples([example], words, NO_LIMITS)
    assert tokenized == [TokenizedExample(0, [0, 11], [[22, 23, 1], [24, 1], [21, 1]], scores=[3.0, 2.0, 1.0])]


def test_unpaired_label_scored_score_and_samples_after_the_rejected(words):
    tokenized, summary = tokenize_examples([UnpairedExample("f:1", "p1", "c1 c2", False)], words, NO_LIMITS)
    assert tokenized == [TokenizedExample(0, [0, 11], [[21, 22, 1]], label=False)]
    assert summary.describe() == "tokenized 1 example: nothing truncated"
    tokenized, _ = tokenize_examples([ScoredExample("f:1", "p2", "c3", -0.5)], words, NO_LIMITS)
    assert tokenized == [TokenizedExample(0, [0, 12], [[23, 1]], scores=[-0.5])]
    tokenized, _ = tokenize_examples([NegativesWithSamplesExample("f:1", "p1", "r1", ["c1", "c2"])], words, NO_LIMITS)
    assert tokenized == [TokenizedExample(0, [0, 11], [[31, 1], [21, 1], [22, 1]])]


def test_every_completion_of_a_list_is_truncated_and_a_list_without_room_is_dropped_whole(words):
    """max_length 5. f:1 prompt [0 11] leaves 3: c1 c2 c3 </s> (4) -> [21 22 23], c4 </s> (2) kept.
    f:2 prompt [0 11 12 13 14] (5) leaves 0: the whole list goes, not one of its completions."""
    lists = [
        RankedExample("f:1", "p1", ["c1 c2 c3", "c4"], [2.0, 1.0]),
        RankedExample("f:2", "p1 p2 p3 p4", ["c1", "c2"], [2.0, 1.0]),
    ]
    tokenized, summary = tokenize_examples(lists, words, DataConfig(max_length=5, max_prompt_length=None))
    assert tokenized == [TokenizedExample(0, [0, 11], [[21, 22, 23], [24, 1]], scores=[2.0, 1.0])]
    assert summary.describe() == (
        "tokenized 2 ranked lists: 1 completion truncated (kept their start: f:1), 1 ranked list dropped because a "
        "completion would be empty: f:2"
    )
    strict = DataConfig(max_length=5, max_prompt_length=None, strict_truncation=True)
    with pytest.raises(DataValidationError, match=r"^1 ranked list would lose the whole completion to truncation"):
        tokenize_examples(lists, words, strict)


def test_samples_are_truncated_like_every_completion(words):
    """max_length 5, prompt [0 11 12] leaves 2: r1 </s> fits, c1 c2 c3 </s> -> [21 22], c4 </s> fits."""
    example = NegativesWithSamplesExample("f:1", "p1 p2", "r1", ["c1 c2 c3", "c4"])
    tokenized, summary = tokenize_examples([example], words, DataConfig(max_length=5, max_prompt_length=None))
    assert tokenized == [TokenizedExample(0, [0, 11, 12], [[31, 1], [21, 22], [24, 1]])]
    assert summary.completions_truncated == 1


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_conversational_lists_tokenize_like_the_pairs():
    """Second implementation: each completion of a ranked list equals that completion tokenized in a pair."""
    tok = tiny_tokenizer()
    prompt, a, b = [user("Rate it")], [assistant("Great film.")], [assistant("Dull.")]
    (ranked,), _ = tokenize_examples([RankedExample("f:1", prompt, [b, a], [0.0, 1.0])], tok, NO_LIMITS)
    (pair,), _ = tokenize_examples([PairExample("f:1", prompt, a, b)], tok, NO_LIMITS)
    assert ranked.prompt_ids == pair.prompt_ids
    assert ranked.completions == [pair.chosen_ids, pair.rejected_ids]  # best (a) first


def test_content_hash_covers_every_completion_label_and_score():
    base = [TokenizedExample(0, [0, 5], [[6, 1], [7, 1], [8, 1]], scores=[2.0, 1.0, 0.0]),
            TokenizedExample(1, [0], [[9, 1]], label=True)]
    digest = content_hash(base)
    assert content_hash([TokenizedExample(0, [0, 5], [[6, 1], [7, 1], [8, 1]], scores=[2.0, 1.0, 0.0]),
                         TokenizedExample(1, [0], [[9, 1]], label=True)]) == digest
    variants = [
        [TokenizedExample(0, [0, 5], [[6, 1], [7, 1], [8, 2]], scores=[2.0, 1.0, 0.0]), base[1]],  # third completion
        [TokenizedExample(0, [0, 5], [[6, 1], [7, 1]], scores=[2.0, 1.0]), base[1]],  # one completion fewer
        [TokenizedExample(0, [0, 5], [[6, 1], [7, 1], [8, 1]], scores=[2.0, 1.0, 0.5]), base[1]],  # a score
        [TokenizedExample(0, [0, 5], [[6, 1], [7, 1], [8, 1]]), base[1]],  # no scores
        [base[0], TokenizedExample(1, [0], [[9, 1]], label=False)],  # the label
        [base[0], TokenizedExample(1, [0], [[9, 1]])],  # no label
        [base[0], TokenizedExample(1, [0], [[9], [1]], label=True)],  # completion boundary
    ]
    assert len({digest, *(content_hash(v) for v in variants)}) == len(variants) + 1
