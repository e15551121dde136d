"""The fixed workloads of the benchmarks: models and preference pairs both systems train on.

Tiny Llamas (hidden 256, 4 layers, 4 heads, MLP 1024, random weights, untied LM head) with a BPE vocabulary
trained on the bundled movie snippets; pairs whose prompt (ending in ``Review:``) and completions (starting
with a space) have *exactly* the stated token counts under both systems' tokenization (checked), so a batch
has no padding and both do the same work whatever order they draw pairs in. SmolLM2-135M-Instruct (the
built-in conversion, ``preftune.assets``) with chat pairs from the movie snippets (``preftune demo``'s pairs:
a one-sentence review request, a positive and a negative review), natural lengths.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

HIDDEN, LAYERS, HEADS = 256, 4, 4
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2 = "builtin:SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # "tiny" or "smollm2"
    vocab: int = 8192
    prompt_tokens: int = 64  # tiny workloads: exact counts (BOS and EOS come on top)
    completion_tokens: int = 96
    lora: bool = False  # LoRA r16 on all projections, reference = adapters off; else a frozen copy
    steps: int = 20  # measured optimizer steps
    warmup: int = 3

    @property
    def tokens_per_pair(self) -> int | None:
        """Non-padding tokens of a pair's two rows, BOS and EOS included (tiny workloads only)."""
        if self.model != "tiny":
            return None
        return 2 * (1 + self.prompt_tokens + self.completion_tokens + 1)

    def describe(self) -> dict:
        out = asdict(self)
        if self.model == "tiny":
            out["architecture"] = f"Llama hidden={HIDDEN} layers={LAYERS} heads={HEADS} mlp={4 * HIDDEN}"
        else:
            out["architecture"] = "SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152, tied head)"
            out["lora"] = f"r16 alpha32 on {', '.join(LORA_TARGETS)}; reference = adapters off"
        return out


WORKLOADS = {
    "tiny-8k": Workload("tiny-8k", "tiny", 8192),
    "tiny-32k": Workload("tiny-32k", "tiny", 32768),
    "tiny-long": Workload("tiny-long", "tiny", 8192, prompt_tokens=500, completion_tokens=60, steps=10),
    "smollm2-lora": Workload("smollm2-lora", "smollm2", lora=True, steps=2, warmup=1),
}
# bf16 runs of the tiny workloads measure fewer steps: on CPUs without bf16 matrix units PyTorch's own bf16
# kernels (TRL's path) take minutes per step.
BF16_STEPS, BF16_WARMUP = 4, 1


def _snippets(seed: int) -> list[str]:
    from preftune.testing import RESOURCES

    lines = (RESOURCES / "movie_review_snippets.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t", 2)[2].strip() for line in lines]
    random.Random(seed).shuffle(texts)
    return texts


def _exact_piece(tokenizer, texts: list[str], start: int, n: int, lead: str = "", suffix: str = "") -> str | None:
    """``lead`` + snippets from ``start`` on, cut to exactly ``n`` tokens with ``suffix`` included; None when
    the cut does not survive decode -> encode unchanged."""
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    text, i = lead + texts[start % len(texts)], start + 1
    while len(encode(text)) < n + 8:
        text += " " + texts[i % len(texts)]
        i += 1
    piece = tokenizer.decode(encode(text)[: n - len(encode(suffix))]) + suffix
    return piece if len(encode(piece)) == n and piece.startswith(lead) else None


def exact_pairs(tokenizer, workload: Workload, count: int, seed: int = 0) -> list[dict]:
    """``count`` text pairs of exactly the workload's token counts whose boundary does not merge under BPE."""
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    texts = _snippets(seed)
    pairs, cursor = [], 0
    while len(pairs) < count:
        cursor += 7
        prompt = _exact_piece(tokenizer, texts, cursor, workload.prompt_tokens, suffix="\nReview:")
        chosen = _exact_piece(tokenizer, texts, cursor + 2, workload.completion_tokens, lead=" ")
        rejected = _exact_piece(tokenizer, texts, cursor + 4, workload.completion_tokens, lead=" ")
        if None in (prompt, chosen, rejected):
            continue
        if all(encode(prompt + c) == encode(prompt) + encode(c) for c in (chosen, rejected)):
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def _tiny_model(workdir: Path, workload: Workload, batch_size: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(vocab_size=workload.vocab)
    config = LlamaConfig(
        vocab_size=workload.vocab, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = workdir / "model"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rows = exact_pairs(tokenizer, workload, batch_size * (workload.steps + workload.warmup))
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def prepare(workdir: Path, workload: Workload, batch_size: int) -> Path:
    """Write the workload's model folder (tiny) and ``pairs.jsonl`` into ``workdir``; returns the model path."""
    if workload.model == "tiny":
        return _tiny_model(workdir, workload, batch_size)
    from preftune.assets import resolve_model_path
    from preftune.experiments.demo import build_demo_pairs

    train, _ = build_demo_pairs(workdir / "demo", seed=0, n_train=batch_size * (workload.steps + workload.warmup),
                                n_eval=0)
    (workdir / "pairs.jsonl").write_text(train.read_text(encoding="utf-8"), encoding="utf-8")
    return Path(resolve_model_path(SMOLLM2))
