"""``preftune online CONFIG``: preference optimization on the policy's own samples, drawn inside every step.

- ``online_dpo`` — Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (OAIF, Algorithm 1):
  for each prompt of the micro-batch, two completions are sampled from the current policy (no gradient), the
  judge says which it prefers, and the recipe's paired objective (DPO, IPO, SLiC, ...) trains on that pair at
  once, against the reference (the starting policy, frozen; or TR-DPO's moving one).
- ``spo`` — Swamy et al. 2024 (see ``objectives/spo.py``): K samples per prompt, each rewarded with its win rate
  against the others, REINFORCE with a leave-one-out baseline and a KL penalty.

Judge failures and ties are explicit: a prompt whose verdict is None (``online/judge_failed``), whose two samples
are the same text (``online/identical``) or whose verdict is within ``online.min_margin`` of ½ (``online/ties``)
is skipped; the logged value is the fraction of the step's prompts. A skipped prompt adds zero to the step's
mean loss (every prompt weighs 1/N of the step, as in the loop's accumulation), so the gradient scale follows
the fraction kept. Sampling is seeded from (``online.sampling.seed``, step, micro-batch, process) under a forked
RNG, so a resumed run draws exactly the samples the uninterrupted one drew.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
from collections import Counter
from pathlib import Path

import torch
import yaml

from .. import modeling
from ..config import save_config
from ..data import PairExample, RankedExample, TokenizedSplits, tokenize_examples
from ..feedback.judges import Judge, build_judge
from ..feedback.sampling import HFSampler, SamplingConfig, encode_prompt
from ..objectives.plan import Component, ObjectivePlan
from ..objectives.spo import SPO, SPOParams
from ..training.loop import Loop, TrainResult, run_log
from ..training.metrics import add_batch_statistics
from ..training.precision import compute_kernels
from ..training.preference import PreferenceTask
from .online_config import OnlineConfig, OnlineSection, load_online_config
from .preferences import win_matrices, win_rates
from .selection import as_completion
from .steps import uses_template

log = logging.getLogger("preftune")


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The sampling seed of one micro-batch: a pure function of where the run is."""
    return random.Random(f"{seed}:{step}:{micro}:{rank}").getrandbits(63)


def spo_plan(beta: float) -> ObjectivePlan:
    return ObjectivePlan(Component(SPO, SPOParams(beta=beta)))


class OnlineTask(PreferenceTask):
    """``PreferenceTask`` whose micro-batches are prompts: ``loss`` samples, judges and scores them."""

    supports_fsdp = supports_deepspeed = False  # each process samples its own prompts (lockstep, engine untested)

    def __init__(self, config, objective, tokenizer, policy, online: OnlineSection, prompts: list, judge: Judge,
                 use_template: bool):
        shape = "pairs" if online.method == "online_dpo" else "ranked"
        note = f"online ({online.method}): {len(prompts)} prompts from {online.prompts.file}, samples drawn each step"
        super().__init__(config, objective, tokenizer, policy, TokenizedSplits([], [], [note]), shape)
        self.online, self.judge = online, judge
        self.prompts = [[{"role": "user", "content": p}] if use_template and isinstance(p, str) else p for p in prompts]
        self.prompt_ids = [encode_prompt(tokenizer, p, use_template) for p in self.prompts]
        self.num_examples = len(prompts)
        self.last_rows: list[dict] = []  # what the last micro-batch trained on (tests, debugging)

    def micro_batch(self, positions: list[int]):
        return {"positions": positions}

    @torch.no_grad()
    def sample(self, positions: list[int], step: int, micro: int) -> list[list[str]]:
        s = self.online.sampling
        sampling = SamplingConfig(num_samples=s.num_samples, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                  top_p=s.top_p, top_k=s.top_k,
                                  seed=step_seed(s.seed, step, micro, self.accelerator.process_index))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.random.fork_rng(devices=devices):  # the loop's own RNG stream is left as it was
                return HFSampler(self.policy, self.tokenizer, sampling).sample(
                    [self.prompt_ids[i] for i in positions], list(range(len(positions))))  # a seed each
        finally:
            self.policy.train(was_training)

    def judged_examples(self, positions: list[int], samples: list[list[str]], counts: Counter) -> list:
        prompts = [self.prompts[i] for i in positions]
        matrices, scores = win_matrices(self.judge, prompts, samples, self.online.pointwise_as, counts)
        if scores is not None:
            counts["score_sum"] += sum(v for row in scores for v in row if v is not None)
            counts["scored"] += sum(v is not None for row in scores for v in row)
        examples = []
        for prompt, texts, matrix in zip(prompts, samples, matrices, strict=True):
            example = self._example(prompt, texts, matrix, counts, len(examples))
            if example is not None:
                examples.append(example)
        return examples

    def _example(self, prompt, texts: list[str], matrix, counts: Counter, n: int):
        source = f"online sample {n}"
        if self.online.method == "spo":
            rates = win_rates(matrix)
            if any(r is None for r in rates):
                counts["judge_failed"] += 1
                return None
            return RankedExample(source, prompt, [as_completion(prompt, t) for t in texts], rates)
        a, b = texts
        p = matrix[0][1]
        if a == b:
            counts["identical"] += 1
        elif p is None:
            counts["judge_failed"] += 1
        elif abs(p - 0.5) <= self.online.min_margin:
            counts["ties"] += 1
        else:
            chosen, rejected = (a, b) if p > 0.5 else (b, a)
            return PairExample(source, prompt, as_completion(prompt, chosen), as_completion(prompt, rejected))
        return None

    def loss(self, module, batch, step: int, micro: int, weight: float, stats) -> tuple[torch.Tensor, int]:
        positions = batch["positions"]
        counts: Counter = Counter()
        examples = self.judged_examples(positions, self.sample(positions, step, micro), counts)
        tokenized, summary = tokenize_examples(examples, self.tokenizer, self.config.data) if examples else ([], None)
        counts["truncated_away"] += len(examples) - len(tokenized)
        for key in ("identical", "judge_failed", "ties", "truncated_away"):
            stats.add(f"online/{key}", counts[key], len(positions))
        stats.add("online/kept", len(tokenized), len(positions))
        if counts["scored"]:
            stats.add("online/judge_score", counts["score_sum"], counts["scored"])
        self.last_rows = [dataclasses.asdict(e) for e in examples]
        if not tokenized:  # nothing to learn from: a zero loss that still reaches every trainable weight
            stats.add("loss", 0.0, len(positions))  # the loop logs `loss` every step; a step with no pair logs 0
            zero = sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0
            return zero, 0
        collated = {k: v.to(self.accelerator.device) for k, v in self.collator(tokenized).items()}
        out, logps = self.scorer(collated, self.state)
        add_batch_statistics(stats, out, logps)
        self.state = {**self.state, **out.state}
        return out.losses.sum() * weight, int(collated["attention_mask"].sum())


def train_online(config: OnlineConfig, judge: Judge | None = None) -> TrainResult:
    """One online run (``judge`` replaces the configured one: tests pass function judges)."""
    from ..feedback.generate import PromptsConfig, read_prompts

    train, online = config.train, config.online
    run_dir = Path(train.training.output_dir)
    with run_log(run_dir):
        p = online.prompts
        prompts = read_prompts(PromptsConfig(file=p.file, columns=p.columns, limit=p.limit))
        log.info("preftune online (%s): %d prompts, run directory %s", online.method, len(prompts), run_dir)
        save_config(train, run_dir / "config.yaml")
        (run_dir / "online.yaml").write_text(yaml.safe_dump(dataclasses.asdict(online), sort_keys=False), encoding="utf-8")
        objective = spo_plan(online.spo_beta) if online.method == "spo" else train.objective.plan()
        if online.method == "spo":  # recorded in final/ as what was trained
            train.objective.name, train.objective.params = "spo", {"beta": online.spo_beta}
        torch.manual_seed(train.training.seed)
        accelerator = modeling.make_accelerator(train.training.precision)
        tokenizer = modeling.load_tokenizer(train.model.name_or_path, train.model.trust_remote_code)
        policy = modeling.load_policy(train).to(accelerator.device)
        use_template = uses_template(train.model.name_or_path, p.chat_template)
        own_judge = judge is None
        judge = judge or build_judge(online.judge, "online.judge.")
        try:
            with compute_kernels(train.training.precision, accelerator.device):
                task = OnlineTask(train, objective, tokenizer, policy, online, prompts, judge, use_template)
                return Loop(train.training, task, accelerator, run_dir).fit()
        finally:
            if own_judge:
                judge.close()


def command(args: argparse.Namespace) -> int:
    """The ``preftune online`` handler."""
    result = train_online(load_online_config(args.config, args.overrides))
    if result.interrupted:
        print(f"interrupted at step {result.steps}; a checkpoint is in {result.run_dir / 'checkpoints'} "
              "(run the same command again to resume)")
        return 130
    print(f"run directory: {result.run_dir}\nfinal model: {result.final_dir}")
    return 0
