"""``preftune frontier CONFIG``: the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, §6.1,
Figure 2 left), end to end and offline.

The task: continue the prefix of a movie review so that the whole review is positive, while staying close to
the starting policy. Every method is one point on the plane (KL(π‖π_ref), mean reward); a better method
reaches more reward for the same KL. The stages, each written under ``output_dir`` and skipped when a rerun
finds it finished (a stopped run resumes where it stopped):

1. ``reward/`` — the ground-truth reward: a sentiment reward model trained by ``preftune reward`` on the
   snippets' human ratings (or ``reward.path``, one trained before). Its held-out sign accuracy is reported.
2. ``prompts/`` — prefixes (``min_words``..``max_words`` words) of distinct snippets: train and held-out
   prompts come from disjoint snippets.
3. ``pairs/`` — ``pairs.num_samples`` continuations per train prompt sampled from the starting policy
   (``preftune generate``), labelled best vs worst by the reward model (``preftune label``).
4. ``methods/NAME/`` — one training run per entry of ``methods`` (DPO at several β, IPO, SimPO, Preferred-FT =
   SFT on the chosen continuations, Unlikelihood, ...), then samples on the held-out prompts, their mean
   reward and their sequence KL from the starting policy (``preftune winrate``'s reward and kl sections).
5. ``best_of_n/`` — no training: the best of n samples of the starting policy under the reward model, for each
   n of ``evaluation.best_of``; its KL is the closed form log n − (n − 1)/n (Stiennon et al. 2020; an upper
   bound, Beirami et al. 2024). n = 1 is the starting policy itself (KL 0).
6. ``frontier.json``, ``frontier.md`` and ``frontier.png`` — the numbers, the report and the plot (also copied
   to ``report_dir`` when it is set).

Every held-out sample is drawn at temperature 1 with top-p 1, so the KL estimate (mean of log π − log π_ref
over the policy's own samples) is unbiased.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...atomic import write_json, write_jsonl
from ...config import ModelConfig
from ...feedback.sampling import SamplingConfig
from .config import (
    FrontierConfig,
    FrontierPromptsConfig,
    check,
    load_frontier_config,
    training_config,
)

log = logging.getLogger("preftune")

# -- stage 1 and 2: reward model, prompts ---------------------------------------------------------------------


def reward_stage(config: FrontierConfig, out: Path) -> tuple[str, dict | None]:
    """(reward model folder, its reward_summary.json if any); trains one unless ``reward.path`` is set or a
    previous run finished it."""
    if config.reward.path:
        summary = Path(config.reward.path).parent / "reward_summary.json"
        return config.reward.path, json.loads(summary.read_text()) if summary.exists() else None
    from ..sentiment_reward import load_sentiment_reward_config, train_sentiment_reward

    run_dir = out / "reward"
    summary, settings_file = run_dir / "reward_summary.json", run_dir / "frontier_settings.json"
    recipe = load_sentiment_reward_config(config.reward.recipe,
                                          [*config.reward.overrides, f"training.output_dir={run_dir}"])
    settings = {"reward": _fingerprint(asdict(recipe))}
    if summary.exists() and settings_file.exists():
        if json.loads(settings_file.read_text()) != settings:
            raise ValueError(f"{run_dir} holds a reward model trained from another recipe or other reward.overrides; "
                             "delete that folder to retrain it, or choose another output_dir")
    else:
        log.info("frontier: training the sentiment reward model (%s)", config.reward.recipe)
        start = time.perf_counter()
        if train_sentiment_reward(recipe)[0].interrupted:
            raise KeyboardInterrupt
        write_json(settings_file, settings)
        _record_time(out, "reward_model", start)
    return str(run_dir / "final"), json.loads(summary.read_text())


def make_prompts(config: FrontierPromptsConfig) -> tuple[list[str], list[str]]:
    """(train, held-out) review prefixes of distinct snippets; the two sets share no snippet and no prefix."""
    from ..snippets import read_snippets

    rng = random.Random(config.seed)
    snippets = [r.text for r in read_snippets(config.file)]
    rng.shuffle(snippets)
    seen, prompts = set(), []
    for text in snippets:
        words = text.split()
        if len(words) <= config.min_words:  # a prefix must leave something of the review to write
            continue
        prefix = " ".join(words[: rng.randint(config.min_words, min(config.max_words, len(words) - 1))])
        if prefix not in seen:
            seen.add(prefix)
            prompts.append(prefix)
        if len(prompts) == config.train + config.eval:
            break
    else:
        raise ValueError(f"{config.file or 'the bundled snippets'}: only {len(prompts)} distinct prefixes, "
                         f"{config.train + config.eval} wanted (prompts.train + prompts.eval)")
    return prompts[config.eval :], prompts[: config.eval]


# -- sampling and judging ------------------------------------------------------------------------------------


def sample(config: FrontierConfig, model: str, prompts_file: Path, output: Path, num_samples: int,
           temperature: float = 1.0, top_p: float = 1.0) -> int:
    """``preftune generate`` on ``prompts_file`` (raw text continuation: no chat template) into ``output``;
    resumable. Returns how many prompts were sampled now."""
    from ...feedback.generate import GenerateConfig, PromptsConfig, generate

    s = config.sampling
    return generate(GenerateConfig(
        model=ModelConfig(name_or_path=model, dtype=s.dtype),
        prompts=PromptsConfig(file=str(prompts_file), chat_template=False),
        sampling=SamplingConfig(num_samples=num_samples, max_new_tokens=s.max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=0, seed=s.seed),
        backend="hf", batch_size=s.batch_size, output_file=str(output), progress_bar=config.progress_bar,
    )).generated


def kl_and_lengths(config: FrontierConfig, model: str, samples: Path, report: Path) -> dict:
    """Sequence KL of ``samples`` from the starting policy and their lengths (``preftune winrate``)."""
    from ...evaluation.winrate import KLConfig, WinrateConfig, evaluate_generations

    return evaluate_generations(WinrateConfig(
        model_file=str(samples),
        kl=KLConfig(reference=config.policy.name_or_path, policy=model, dtype="float32",
                    batch_size=config.evaluation.kl_batch_size),
        chunk_size=64, output_file=str(report), progress_bar=config.progress_bar,
    ))


def reward_stats(rewards: list[float], threshold: float | None) -> dict:
    """Mean reward with its standard error and, given the reward model's sign threshold, the fraction of
    samples it reads as positive reviews (the closest thing to the paper's classifier probability)."""
    stats = {"reward": statistics.fmean(rewards), "reward_stderr": _stderr(rewards)}
    if threshold is not None:
        positive = sum(r > threshold for r in rewards) / len(rewards)
        stats.update(positive=positive, positive_stderr=math.sqrt(positive * (1 - positive) / len(rewards)))
    return stats


def best_of_n(scores: list[list[float]], n: int, lengths: list[list[int]] | None = None,
              threshold: float | None = None) -> dict:
    """Best-of-n from ``scores`` (per prompt, the rewards of its samples): every prompt's samples are cut into
    ⌊len/n⌋ disjoint groups of n, and the reward of a group is its best (the first best on a tie). KL is the
    closed form. ``lengths`` (tokens of each sample) gives the mean length of the chosen samples."""
    chosen = [(p, max(range(i, i + n), key=lambda j: (scores[p][j], -j)))
              for p in range(len(scores)) for i in range(0, len(scores[p]) - n + 1, n)]
    point = {**reward_stats([scores[p][j] for p, j in chosen], threshold), "groups": len(chosen),
             "kl": math.log(n) - (n - 1) / n, "kl_stderr": 0.0}
    if lengths is not None:
        point["mean_tokens"] = statistics.fmean(lengths[p][j] for p, j in chosen)
    return point


def _stderr(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


# -- the experiment ------------------------------------------------------------------------------------------


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class _Stage:
    """Where an experiment stands: its output folder, the reward judge, and the wall time of each shared stage
    (kept in ``timings.json``: a rerun that finds a stage finished keeps the time of the run that did it)."""

    config: FrontierConfig
    out: Path
    judge: Any = None
    threshold: float | None = None  # the reward model's sign threshold: reward above it reads as positive

    def timed(self, name: str, start: float, did_work: bool = True) -> None:
        if did_work:
            _record_time(self.out, name, start)

    def timings(self) -> dict[str, float]:
        path = self.out / "timings.json"
        return json.loads(path.read_text()) if path.exists() else {}


def _record_time(out: Path, name: str, start: float) -> None:
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    write_json(path, {**timings, name: round(time.perf_counter() - start, 1)})


def _scored_samples(stage: _Stage, samples: Path) -> list[list[float]]:
    from ...evaluation.winrate import WinrateConfig, load_generations, score_file

    scores = score_file(stage.judge, load_generations(str(samples)), WinrateConfig(progress_bar=False, chunk_size=64))
    if any(s is None for row in scores for s in row):
        raise ValueError(f"{samples}: the reward model returned no score for some samples")
    return scores


def _baseline_points(stage: _Stage, prompts_file: Path) -> list[dict]:
    """Best-of-n for each n of ``evaluation.best_of`` from one set of max(n) samples per held-out prompt."""
    config = stage.config
    if not config.evaluation.best_of:
        return []
    from ...evaluation.winrate import load_generations
    from ...feedback.sampling import load_tokenizer_for

    start = time.perf_counter()
    samples = stage.out / "best_of_n" / "samples.jsonl"
    did_work = sample(config, config.policy.name_or_path, prompts_file, samples, max(config.evaluation.best_of))
    scores = _scored_samples(stage, samples)
    stage.timed("best_of_n_sampling", start, did_work > 0)
    tokenizer = load_tokenizer_for(config.policy.name_or_path)
    lengths = [[len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in row.completions]
               for row in load_generations(str(samples)).rows]
    points = []
    for n in sorted(set(config.evaluation.best_of)):
        label = "starting policy" if n == 1 else f"best of {n}"
        points.append({"name": f"best_of_{n}", "family": "best_of_n", "label": label, "params": {"n": n},
                       "kl_from": "closed form log n - (n-1)/n", **best_of_n(scores, n, lengths, stage.threshold)})
    return points


def _method_point(stage: _Stage, index: int, pairs_file: Path, prompts_file: Path) -> dict:
    """Train method ``index`` (resuming a stopped run), sample the held-out prompts, evaluate; cached in
    ``methods/NAME/point.json`` together with a fingerprint of everything that produced it."""
    from ...training import train

    config, out = stage.config, stage.out
    method = config.methods[index]
    train_config = training_config(config, index, pairs_file, out)
    run_dir = out / "methods" / method.name
    settings = asdict(train_config)
    settings["training"].pop("progress_bar")  # how a run looks, not what it computes
    fingerprint = _fingerprint({"training": settings, "pairs": _file_digest(pairs_file),
                                "prompts": _file_digest(prompts_file), "sampling": asdict(config.sampling),
                                "evaluation": config.evaluation.num_samples})
    cached = run_dir / "point.json"
    if cached.exists():
        point = json.loads(cached.read_text())
        if point.get("fingerprint") == fingerprint:
            log.info("frontier: %s already evaluated (%s)", method.name, cached)
            return point
        raise ValueError(f"{cached} was produced with other settings (method, pairs, prompts or sampling changed); "
                         "delete that folder to recompute it, or give the method another name")
    start = time.perf_counter()
    result = train(train_config)
    if result.interrupted:
        raise KeyboardInterrupt
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    samples = run_dir / "samples.jsonl"
    sample(config, str(result.final_dir), prompts_file, samples, config.evaluation.num_samples)
    rewards = [r for row in _scored_samples(stage, samples) for r in row]
    report = kl_and_lengths(config, str(result.final_dir), samples, run_dir / "evaluation.json")
    params = {k: v for k, v in method.objective.items() if k != "name"}
    point = {"name": method.name, "family": method.family or method.objective["name"], "label": method.name,
             "objective": method.objective["name"], "params": params, **reward_stats(rewards, stage.threshold),
             "kl": report["kl"]["mean"], "kl_stderr": report["kl"]["stderr"],
             "mean_tokens": report["lengths"]["model"].get("tokens/mean"),
             "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.perf_counter() - start, 1),
             "train_metrics": result.eval_after or {}, "fingerprint": fingerprint}
    write_json(cached, point)
    return point


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_frontier(config: FrontierConfig, judge=None) -> dict:
    """Every stage (see the module docstring); returns the report, also written to ``frontier.json``.
    ``judge`` replaces the reward model (tests pass a function judge)."""
    from ...feedback.judges import build_judge
    from ...feedback.label import LabelConfig, label

    check(config)
    out = Path(config.output_dir)
    stage = _Stage(config, out)
    reward_path, reward_summary = (None, None) if judge is not None else reward_stage(config, out)
    stage.threshold = ((reward_summary or {}).get("sentiment") or {}).get("sign_threshold")
    stage.judge = judge or build_judge({"type": "reward_model", "path": reward_path, "include_prompt": True,
                                        "batch_size": config.reward.batch_size})
    train_prompts, eval_prompts = make_prompts(config.prompts)
    train_file, eval_file = out / "prompts" / "train.jsonl", out / "prompts" / "eval.jsonl"
    write_jsonl(train_file, [{"prompt": p} for p in train_prompts])
    write_jsonl(eval_file, [{"prompt": p} for p in eval_prompts])

    start = time.perf_counter()
    p = config.pairs
    generations = out / "pairs" / "samples.jsonl"
    did_work = sample(config, config.policy.name_or_path, train_file, generations, p.num_samples, p.temperature, p.top_p)
    stage.timed("pair_sampling", start, did_work > 0)
    start = time.perf_counter()
    pairs_file = out / "pairs" / "pairs.jsonl"
    label_summary = label(LabelConfig(input_file=str(generations), output_file=str(pairs_file), format="best_vs_worst",
                                      min_margin=p.min_margin, progress_bar=config.progress_bar), stage.judge)
    stage.timed("labelling", start)

    points = _baseline_points(stage, eval_file)
    for index in range(len(config.methods)):
        points.append(_method_point(stage, index, pairs_file, eval_file))
    from .report import write_report

    report = {
        "title": config.title, "policy": config.policy.name_or_path,
        "reward_model": {"path": reward_path, "sentiment": (reward_summary or {}).get("sentiment"),
                         "eval_after": (reward_summary or {}).get("eval_after")},
        "prompts": {"train": len(train_prompts), "eval": len(eval_prompts)},
        "pairs": {k: label_summary[k] for k in ("rows_written", "all_tied_prompts", "tied_pairs", "empty_completions",
                                                 "duplicate_completions")},
        "sampling": asdict(config.sampling), "evaluation": asdict(config.evaluation),
        "points": points, "seconds": {**stage.timings(),
                                      "training": round(sum(p.get("train_seconds", 0) for p in points), 1),
                                      "evaluation": round(sum(p.get("eval_seconds", 0) for p in points), 1)},
    }
    write_report(report, out)
    if config.report_dir:
        report_dir = Path(config.report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        for name in ("frontier.json", "frontier.md", "frontier.png"):
            shutil.copyfile(out / name, report_dir / name)
    return report


def command(args: argparse.Namespace) -> int:
    """The ``preftune frontier`` handler."""
    config = load_frontier_config(args.config, args.overrides)
    report = run_frontier(config)
    from .report import format_table

    print(format_table(report["points"]))
    where = Path(config.report_dir or config.output_dir)
    print(f"report: {where / 'frontier.md'}\nplot:   {where / 'frontier.png'}")
    return 0
