"""``preftune revise CONFIG``: the supervised stage of Constitutional AI (Bai et al. 2022, §3.1): a chat model
answers each prompt, then critiques its own answer against a principle drawn from the constitution and rewrites
it; ``revisions`` such passes, each with its own principle. The final revisions are SFT data.

Output (JSONL, one row per prompt, in prompt order): ``prompt``, ``completion`` (the last revision: the rows
train with ``preftune sft``), ``initial`` (the first answer), ``steps`` (per pass: ``principle``, ``critique``,
``revision``), ``model`` and ``generation`` (the settings). Resumable like ``preftune generate``: every
finished batch is appended and fsync'ed, a rerun does only the missing prompts, and a file written with other
settings is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, ModelConfig, beside, load_section
from .constitution import Principle, draw, load_constitution
from .generate import PromptsConfig, _append, finished_indices, read_finished, read_prompts
from .sampling import SamplingConfig

log = logging.getLogger("preftune")


@dataclass
class ReviseConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the chat model that answers, critiques and revises
    prompts: PromptsConfig = field(default_factory=PromptsConfig)  # e.g. red-teaming prompts
    constitution: str = ""  # a YAML list of {name, critique, revision, comparison}; "" = the bundled example
    revisions: int = 1  # critique -> revision passes per prompt, each with a principle drawn for it
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=1, max_new_tokens=128,
                                                                              temperature=0.7, top_p=0.95))
    batch_size: int = 8  # prompts per generate call
    output_file: str = "runs/revise/revisions.jsonl"
    progress_bar: bool = True


def _check(config: ReviseConfig) -> None:
    if not config.model.name_or_path:
        raise ConfigError("config key 'model.name_or_path': no chat model")
    if not config.prompts.file:
        raise ConfigError("config key 'prompts.file': no prompts")
    for key, value in (("revisions", config.revisions), ("batch_size", config.batch_size),
                       ("sampling.max_new_tokens", config.sampling.max_new_tokens)):
        if value <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {value}")
    if config.sampling.num_samples != 1:
        raise ConfigError("config key 'sampling.num_samples': revise writes one answer per prompt; it must be 1")
    load_constitution(config.constitution, "constitution")


def load_revise_config(path: str | Path, overrides: list[str] = ()) -> ReviseConfig:
    config = load_section(ReviseConfig, path, overrides, _check)
    config.prompts.file = beside(Path(path).parent, config.prompts.file)
    config.constitution = beside(Path(path).parent, config.constitution)
    return config


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class Reviser:
    """Critique -> revision passes for a batch of prompts with one sampler (every call seeded by its stage)."""

    def __init__(self, config: ReviseConfig, sampler, tokenizer, principles: list[Principle]):
        self.config, self.sampler, self.tokenizer, self.principles = config, sampler, tokenizer, principles

    def _reply(self, conversations: list[list[dict]], indices: list[int], stage: int) -> list[str]:
        from .sampling import encode_prompt

        ids = [encode_prompt(self.tokenizer, c, True) for c in conversations]
        seed = self.config.sampling.seed * 1000 + stage  # each stage of a batch draws its own seeded stream
        self.sampler.sampling = dataclasses.replace(self.config.sampling, seed=seed)
        return [texts[0].strip() for texts in self.sampler.sample(ids, indices)]

    def rows(self, prompts: list, indices: list[int]) -> list[dict]:
        chats = [_as_messages(p) for p in prompts]
        answers = self._reply(chats, indices, 0)
        initial, steps = list(answers), [[] for _ in prompts]
        for n in range(self.config.revisions):
            principles = [draw(self.principles, self.config.sampling.seed, i, n) for i in indices]
            asked = [[*c, {"role": "assistant", "content": a}, {"role": "user", "content": p.critique}]
                     for c, a, p in zip(chats, answers, principles, strict=True)]
            critiques = self._reply(asked, indices, 2 * n + 1)
            rewrite = [[*q, {"role": "assistant", "content": c}, {"role": "user", "content": p.revision}]
                       for q, c, p in zip(asked, critiques, principles, strict=True)]
            revised = self._reply(rewrite, indices, 2 * n + 2)
            for k, (p, c, r) in enumerate(zip(principles, critiques, revised, strict=True)):
                steps[k].append({"principle": p.name, "critique": c, "revision": r})
                answers[k] = r or answers[k]  # an empty rewrite keeps the answer it was asked to revise
        return [{"prompt": prompt, "completion": a if isinstance(prompt, str) else [{"role": "assistant", "content": a}],
                 "initial": first, "steps": s} for prompt, a, first, s in zip(prompts, answers, initial, steps, strict=True)]


def revise(config: ReviseConfig, sampler=None) -> dict:
    """Run (or resume) the job; ``sampler`` (an HFSampler-like object) skips model loading. Returns counts."""
    from tqdm.auto import tqdm

    from .sampling import HFSampler, load_for_sampling, load_tokenizer_for

    _check(config)
    principles = load_constitution(config.constitution, "constitution")
    prompts = read_prompts(config.prompts)
    tokenizer = load_tokenizer_for(config.model.name_or_path, config.model.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"config key 'model.name_or_path': {config.model.name_or_path} has no chat template; "
                          "critiques and revisions are turns of a conversation")
    settings = {**dataclasses.asdict(config.sampling), "revisions": config.revisions,
                "constitution": [dataclasses.asdict(p) for p in principles]}
    out = Path(config.output_file)
    done = finished_indices(read_finished(out), prompts, config.model.name_or_path, settings, out)
    pending = [i for i in range(len(prompts)) if i not in done]
    if pending:
        if sampler is None:
            import torch

            model = load_for_sampling(config.model.name_or_path, config.model)
            sampler = HFSampler(model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer, config.sampling)
        reviser = Reviser(config, sampler, tokenizer, principles)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as handle, tqdm(total=len(prompts), initial=len(done), desc="revising",
                                                             disable=not config.progress_bar) as bar:
            for start in range(0, len(pending), config.batch_size):
                batch = pending[start : start + config.batch_size]
                rows = reviser.rows([prompts[i] for i in batch], batch)
                _append(handle, [{"index": i, **row, "model": config.model.name_or_path, "generation": settings}
                                 for i, row in zip(batch, rows, strict=True)])
                bar.update(len(batch))
    return {"output_file": str(out), "prompts": len(prompts), "revised": len(pending), "resumed": len(done)}


def command(args: argparse.Namespace) -> int:
    """The ``preftune revise`` handler."""
    result = revise(load_revise_config(args.config, args.overrides))
    print(f"{result['output_file']}: {result['prompts']} prompts ({result['revised']} revised now, "
          f"{result['resumed']} already there); train on it with preftune sft (data.train_file)")
    return 0
