"""The sequence_classifier judge on tiny randomly initialised reward models saved locally: its batched,
padded scores equal one unpadded forward per text, on text the test renders by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from preftune.config import ConfigError
from preftune.feedback.judges import build_judge
from preftune.testing import save_tiny_model, tiny_tokenizer

PROMPTS = ["Review this film:", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "Rate the movie."}], "Your opinion of the movie:"]
COMPLETIONS = ["A quiet, moving story.", "Bad.", "One of the best films of the year, with a great cast and score."]


def save_classifier(folder, num_labels=1, labels=None, chat_template=True, pad=True, seed=0):
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2 if pad else None, num_labels=num_labels)
    if labels:
        config.id2label, config.label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tiny_tokenizer(chat_template=chat_template).save_pretrained(folder)
    return folder


def chatml(prompt, completion) -> str:
    """preftune.testing.CHATML_TEMPLATE written out: BOS, then <|im_start|>ROLE\\nCONTENT<|im_end|>\\n a turn."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    turns = turns + [{"role": "assistant", "content": completion}]
    return "<s>" + "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)


def forward_alone(folder, ids: list[int], label: int = 0) -> float:
    model = LlamaForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return float(model(torch.tensor([ids])).logits[0, label])


def test_scores_equal_an_unpadded_forward_of_the_chat_template_text(tmp_path):
    folder = save_classifier(tmp_path / "rm")
    tokenizer = tiny_tokenizer()
    judge = build_judge({"type": "sequence_classifier", "path": str(folder), "batch_size": 2})
    scores = judge.score(PROMPTS, COMPLETIONS)
    expected = [forward_alone(folder, tokenizer(chatml(p, c), add_special_tokens=False).input_ids)
                for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == 3  # three different texts: a random head gives three different scores
    # compare(): 1.0 when the first completion scores higher, 0.0 when lower
    both = judge.score([PROMPTS[0]] * 2, [COMPLETIONS[0], COMPLETIONS[2]])
    assert judge.compare([PROMPTS[0]], [COMPLETIONS[0]], [COMPLETIONS[2]]) == [1.0 if both[0] > both[1] else 0.0]
    assert judge.compare([PROMPTS[0]], [COMPLETIONS[2]], [COMPLETIONS[0]]) == [0.0 if both[0] > both[1] else 1.0]
    assert judge.summary()["judged"] == 3 + 2 + 2 + 2


def test_text_pairs_without_a_template_and_a_named_label(tmp_path):
    """Tokenizer without chat template: tokenizer(prompt, completion), whose post-processor writes
    "<s> prompt <s> completion" (preftune.testing.tiny_tokenizer); the score is the 'positive' logit."""
    folder = save_classifier(tmp_path / "rm2", num_labels=2, labels=["negative", "positive"], chat_template=False)
    tokenizer = tiny_tokenizer(chat_template=False)
    judge = build_judge({"type": "sequence_classifier", "path": str(folder), "label": "positive"})
    prompts, completions = [PROMPTS[0], PROMPTS[2]], [COMPLETIONS[0], COMPLETIONS[2]]
    bos = tokenizer.bos_token_id
    expected = [forward_alone(folder, [bos] + tokenizer.encode(p, add_special_tokens=False) + [bos]
                              + tokenizer.encode(c, add_special_tokens=False), label=1)
                for p, c in zip(prompts, completions, strict=True)]
    assert judge.score(prompts, completions) == pytest.approx(expected, abs=1e-5)


def test_without_a_pad_id_each_text_is_scored_alone(tmp_path):
    folder = save_classifier(tmp_path / "rm3", pad=False)
    tokenizer = tiny_tokenizer()
    judge = build_judge({"type": "sequence_classifier", "path": str(folder), "batch_size": 8})
    expected = [forward_alone(folder, tokenizer(chatml(p, c), add_special_tokens=False).input_ids)
                for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert judge.score(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-5)


def test_long_texts_keep_their_first_token_and_their_end(tmp_path):
    folder = save_classifier(tmp_path / "rm4")
    ids = tiny_tokenizer()(chatml(PROMPTS[1], COMPLETIONS[2]), add_special_tokens=False).input_ids
    judge = build_judge({"type": "sequence_classifier", "path": str(folder), "max_length": 12})
    assert judge.score([PROMPTS[1]], [COMPLETIONS[2]]) == pytest.approx([forward_alone(folder, ids[:1] + ids[-11:])],
                                                                        abs=1e-5)
    assert judge.summary()["truncated"] == 1


def test_configuration_errors(tmp_path):
    two = save_classifier(tmp_path / "two", num_labels=2, labels=["bad", "good"])
    with pytest.raises(ConfigError, match=r"'judge.label': .*two has 2 outputs \(0: 'bad', 1: 'good'\); name the one"):
        build_judge({"type": "sequence_classifier", "path": str(two)})
    with pytest.raises(ConfigError, match=r"'judge.label': .*two has no label 'great'; its labels are 0: 'bad'"):
        build_judge({"type": "sequence_classifier", "path": str(two), "label": "great"})
    causal = save_tiny_model(tmp_path / "causal")
    with pytest.raises(ConfigError, match=r"is a LlamaForCausalLM checkpoint, not a sequence classifier"):
        build_judge({"type": "sequence_classifier", "path": str(causal)})
    with pytest.raises(ConfigError, match=r"config key 'judge.path': cannot load .*absent"):
        build_judge({"type": "sequence_classifier", "path": str(tmp_path / "absent")})
