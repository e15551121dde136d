"""Tiny, fully local models and tokenizers for tests and benchmarks: nothing is downloaded.

``tiny_tokenizer()`` trains a byte-level BPE (a few hundred merges) on the bundled movie snippets, with
BOS/EOS/PAD and a ChatML chat template, so boundary, BOS and template behaviour are those of a real
Hugging Face fast tokenizer. ``tiny_llama()`` is a 2-layer Llama with hidden size 64 built from a config.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .experiments.snippets import SNIPPETS

RESOURCES = SNIPPETS.parent
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus(limit: int = 3000) -> list[str]:
    """The first ``limit`` snippet texts as written (a corpus to train the tiny tokenizer on)."""
    lines = SNIPPETS.read_text(encoding="utf-8").splitlines()[1 : limit + 1]
    return [line.split("\t", 2)[2] for line in lines]


@functools.cache
def _trained_bpe(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512, add_bos: bool = True, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A fast BPE tokenizer; ``add_bos`` makes it prepend ``<s>`` like Llama tokenizers do."""
    tok = Tokenizer.from_str(_trained_bpe(vocab_size))
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama(vocab_size: int = 512, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama, deterministic for a given seed."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def save_tiny_model(folder: Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a tiny Llama + tokenizer to ``folder`` so configs can point ``model.name_or_path`` at it."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_llama(vocab_size, seed).save_pretrained(folder)
    tiny_tokenizer(vocab_size).save_pretrained(folder)
    return folder


def cache_hub_dataset(name: str, splits: dict[str, list[dict]], cache_dir: Path, subset: str = "default") -> Path:
    """Write ``splits`` (split name -> rows) into a datasets cache folder the way ``datasets.load_dataset(name)``
    leaves a hub dataset it downloaded (``<owner>___<name>/<subset>/0.0.0/<revision>/``), so that with
    ``HF_HUB_OFFLINE=1`` and that cache, ``load_dataset(name, subset, split=...)`` finds it without a network.
    Built with datasets' own JSON builder; returns the prepared folder."""
    import json
    import tempfile

    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.json.json import Json

    owner, _, dataset = name.rpartition("/")
    snake = camelcase_to_snakecase(dataset)
    sources = Path(tempfile.mkdtemp(prefix="hub-source-"))
    files = {}
    for split, rows in splits.items():
        files[split] = str(sources / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    folder = Path(cache_dir) / ("___".join(filter(None, (owner, snake)))) / subset / "0.0.0" / ("0" * 40)
    builder = Json(cache_dir=str(sources / "build"), dataset_name=snake, config_name=subset, config_id=subset,
                   data_files=files)
    builder.download_and_prepare(output_dir=str(folder))
    return folder


def main(argv: list[str] | None = None) -> int:
    """``python -m preftune.testing FOLDER``: write the tiny model there, to try any command in seconds."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m preftune.testing",
                                     description="Write a tiny random Llama (2 layers, hidden 64) and its tokenizer "
                                                 "to FOLDER, to try every command in seconds (it learns nothing).")
    parser.add_argument("folder", type=Path)
    folder = save_tiny_model(parser.parse_args(argv).folder)
    print(f"tiny model written to {folder}; use it with model.name_or_path={folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
