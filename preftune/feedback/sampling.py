"""Sampling completions from a causal LM: prompt rendering, model (or adapter) loading, two backends.

Both backends take token ids rendered here, so the HF and vLLM paths see exactly the same prompt tokens
(one BOS, the chat template's generation header) and return the completions as text. The Hugging Face
backend pads on the left (a decoder-only model continues from the last position of every row) and decodes
with preftune's batched loop (``decode``), or ``model.generate`` for models that loop does not cover; the
vLLM backend is used only when vLLM is importable and a GPU is present.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import modeling
from ..config import ModelConfig

log = logging.getLogger("preftune")


@dataclass
class SamplingConfig:
    num_samples: int = 4  # K completions per prompt
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy (then all K completions are the same)
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps the whole distribution
    top_k: int = 0  # 0: off (transformers would otherwise apply its default of 50)
    seed: int = 0


def prompt_seed(seed: int, index: int) -> int:
    """The RNG seed of the prompt at ``index`` in the prompt file (with ``model.generate``, of the batch that
    starts there): a resumed job reproduces what an uninterrupted one would have sampled (string seeding of
    ``random`` is stable across runs)."""
    return random.Random(f"{seed}:{index}").getrandbits(63)


adapter_base = modeling.adapter_base  # where a PEFT adapter folder's base is, or None for a model folder


def load_for_sampling(name_or_path: str, model_cfg: ModelConfig, key: str = modeling.TRUST_KEY) -> nn.Module:
    """A full model folder, or a PEFT adapter folder merged into its base (merging makes every generated
    token as cheap as with the plain model)."""
    return modeling.load_merged(name_or_path, model_cfg, key=key)


def load_tokenizer_for(name_or_path: str, trust_remote_code: bool = False, key: str = modeling.TRUST_KEY):
    """The adapter folder's own tokenizer when it saved one (preftune's final/ does), else the base's."""
    return modeling.load_tokenizer(name_or_path, trust_remote_code, key)


def encode_prompt(tokenizer, prompt: str | list[dict], use_template: bool) -> list[int]:
    """Token ids the completion continues from: the chat template with its generation header (a text
    prompt is the user's message), or the text itself with the tokenizer's usual BOS."""
    if use_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote any BOS itself
    return tokenizer(prompt)["input_ids"]


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids: the model's generation config may end turns with another token (<|im_end|>)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({*ids, tokenizer.eos_token_id})


class HFSampler:
    """K samples per prompt: preftune's decode loop (``decode_stream``: one prefill per prompt, continuous
    batching over a slot KV cache) where the model supports it, else ``model.generate`` with
    ``num_return_sequences`` on left-padded batches. Greedy decoding gives ``generate``'s tokens either way;
    sampling is seeded per prompt index (``prompt_seed(seed, index)``; per batch with ``generate``), so a resumed
    job samples what an uninterrupted one would."""

    def __init__(self, model: nn.Module, tokenizer, sampling: SamplingConfig):
        from .decode import decode_supported

        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.fast = decode_supported(model)

    def _options(self) -> dict:
        s = self.sampling
        options = {"max_new_tokens": s.max_new_tokens, "num_return_sequences": s.num_samples, "use_cache": True,
                   "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.stop_ids,
                   "repetition_penalty": 1.0}  # explicit: a model's generation_config would otherwise apply its own
        if s.temperature > 0:
            options.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        else:  # transformers refuses several greedy sequences per prompt: one, repeated
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_return_sequences=1)
        return options

    def _generate(self, prompt_ids: list[list[int]], seed: int) -> list[list[int]]:
        width = max(len(ids) for ids in prompt_ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=self.device)
        torch.manual_seed(seed)
        return self.model.generate(input_ids=input_ids, attention_mask=mask, **self._options())[:, width:].tolist()

    def sample(self, prompt_ids: list[list[int]], indices: list[int]) -> list[list[str]]:
        """K completion texts for each prompt; ``indices`` (positions in the prompt file) pick the seeds."""
        out: list[list[str]] = [[] for _ in prompt_ids]
        for position, texts in self.stream(prompt_ids, indices, len(prompt_ids)):
            out[position] = texts
        return out

    def stream(self, prompt_ids: list[list[int]], indices: list[int], concurrent: int) -> Iterator[tuple[int, list[str]]]:
        """``(position in prompt_ids, its K completion texts)`` as prompts finish, ``concurrent`` prompts
        decoding at once. With preftune's loop a finished prompt's rows are refilled by the next prompt at once
        (continuous batching) and prompt i's samples depend on ``prompt_seed(seed, indices[i])`` only; with
        ``generate``, batches of ``concurrent`` prompts are seeded from their first prompt's index."""
        from .decode import DecodeSettings, decode_stream

        s = self.sampling
        per_prompt = s.num_samples if s.temperature > 0 else 1  # greedy: every sample is the same

        def texts(tokens: list[list[int]]) -> list[str]:
            decoded = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            return decoded if per_prompt > 1 else decoded * s.num_samples

        if self.fast:
            settings = DecodeSettings(s.max_new_tokens, self.stop_ids, self.tokenizer.pad_token_id, s.temperature,
                                      s.top_p, s.top_k)
            seeds = [prompt_seed(s.seed, i) for i in indices]
            for position, tokens in decode_stream(self.model, prompt_ids, settings, per_prompt, seeds,
                                                  concurrent * per_prompt):
                yield position, texts(tokens)
            return
        for start in range(0, len(prompt_ids), concurrent):
            batch = prompt_ids[start : start + concurrent]
            with torch.no_grad():
                tokens = self._generate(batch, prompt_seed(s.seed, indices[start]))
            for n in range(len(batch)):
                yield start + n, texts(tokens[n * per_prompt : (n + 1) * per_prompt])


class VLLMSampler:
    """vLLM's continuous batching; each prompt gets its own seed, so results do not depend on batching."""

    def __init__(self, name_or_path: str, model_cfg: ModelConfig, sampling: SamplingConfig):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        path = Path(modeling.resolve(name_or_path))
        base = adapter_base(path)
        kwargs = {"model": modeling.resolve(base) if base else str(path), "dtype": model_cfg.dtype,
                  "seed": sampling.seed, "trust_remote_code": model_cfg.trust_remote_code}
        self.lora = None
        if base:
            rank = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("r", 16)
            kwargs.update(enable_lora=True, max_lora_rank=max(8, rank))
            self.lora = LoRARequest("adapter", 1, str(path))
        self.llm, self.sampling = LLM(**kwargs), sampling

    def sample(self, prompt_ids: list[list[int]], indices: list[int]) -> list[list[str]]:
        from vllm import SamplingParams

        s = self.sampling
        params = [
            SamplingParams(n=s.num_samples, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1,
                           max_tokens=s.max_new_tokens, seed=prompt_seed(s.seed, i))
            for i in indices
        ]
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        return [[c.text for c in out.outputs] for out in outputs]


def vllm_usable() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def pick_backend(backend: str) -> str:
    """``auto`` -> vllm when it is importable and a GPU is present, else hf; ``vllm`` must be usable."""
    if backend == "vllm" and not vllm_usable():
        why = "vllm is not installed" if importlib.util.find_spec("vllm") is None else "no CUDA GPU is visible"
        raise ValueError(f"backend: vllm was asked for but {why}; install vllm on a GPU machine, or set backend: hf")
    if backend == "auto":
        return "vllm" if vllm_usable() else "hf"
    return backend
