"""``preftune winrate CONFIG``: evaluate a model from its generations (files written by ``preftune generate``).

Each section is computed only when its inputs are configured, and written to ``output_file`` (JSON):

- ``win_rate`` (``baseline_file`` + ``judge``): the model's completions against the baseline's on the same
  prompts, sample k against sample k; ties count half and are reported separately; bootstrap interval over
  prompts (``analysis/winrate.py``).
- ``reward`` (a pointwise ``judge``): mean judge score of every completion of each file.
- ``kl`` (``kl.reference``): sequence KL(π‖π_ref) estimated from the model's samples (``analysis/kl.py``).
- ``lengths`` (on by default): characters and tokens per completion, mean / median / p90.

With a pointwise judge every completion is scored once, and the verdicts follow from the scores.

Under ``accelerate launch`` / ``torchrun`` the judge's chunks and the KL batches are shared out over the
processes (``feedback.shards``), gathered in order, and the main process writes the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, ModelConfig, beside, load_section
from ..data import read_rows
from ..feedback.judges import Judge, build_judge, judge_config, preference_from_scores
from ..feedback.label import Generation, read_generations
from ..feedback.shards import Processes
from .analysis.kl import estimate_kl, sample_ids
from .analysis.lengths import length_stats
from .analysis.winrate import win_rate

log = logging.getLogger("preftune")
TRUST_KEY = "kl.trust_remote_code"  # the KL and length sections load models and tokenizers


@dataclass
class BootstrapConfig:
    samples: int = 1000  # resamples of the prompts
    confidence: float = 0.95
    seed: int = 0


@dataclass
class KLConfig:
    reference: str = ""  # the reference model (folder, builtin:NAME or adapter); "" = no KL section
    policy: str | None = None  # null: the model named in model_file (the one that sampled it)
    dtype: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = 8  # samples per forward pass
    logps_chunk_size: int = 1024
    trust_remote_code: bool = False  # run Python modules the policy's or reference's folder ships (auto_map)


@dataclass
class LengthsConfig:
    enabled: bool = True
    tokenizer: str | None = None  # null: the policy's (kl.policy, else the model named in model_file)


@dataclass
class WinrateConfig:
    model_file: str = ""  # generations of the model under test
    baseline_file: str | None = None  # generations of the baseline on the same prompts (enables win_rate)
    judge: dict[str, Any] = field(default_factory=dict)  # any judge: `type:` plus its keys (see configs/label.yaml)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    lengths: LengthsConfig = field(default_factory=LengthsConfig)
    chunk_size: int = 64  # prompts per judge call; the progress bar moves per chunk
    output_file: str = "runs/eval/winrate.json"
    progress_bar: bool = True


@dataclass
class GenerationsFile:
    path: str
    rows: list[Generation]
    model: str | None  # the `model` the file was sampled from
    settings: dict  # its `generation` settings (temperature, max_new_tokens, chat_template, ...)


def _check(config: WinrateConfig) -> None:
    if not config.model_file:
        raise ConfigError("config key 'model_file': the generations file to evaluate is not set")
    if config.baseline_file and not config.judge:
        raise ConfigError("config key 'baseline_file' is set but section 'judge' is missing: a win rate needs a judge")
    if config.judge:
        judge_config(config.judge)  # its keys are checked now, before any file is read or model loaded
    b = config.bootstrap
    if b.samples <= 0 or not 0 < b.confidence < 1 or config.chunk_size <= 0 or config.kl.batch_size <= 0:
        raise ConfigError("config keys 'bootstrap.samples', 'chunk_size', 'kl.batch_size' must be > 0 and "
                          "'bootstrap.confidence' in (0, 1)")


def load_winrate_config(path: str | Path, overrides: list[str] = ()) -> WinrateConfig:
    config = load_section(WinrateConfig, path, overrides, _check)
    for attr in ("model_file", "baseline_file"):
        setattr(config, attr, beside(Path(path).parent, getattr(config, attr)))
    return config


def load_generations(path: str) -> GenerationsFile:
    rows = read_generations(path)  # validated, every problem reported with file:line
    first = next((r.value for r in read_rows(path) if isinstance(r.value, dict)), {})
    return GenerationsFile(path, rows, first.get("model"), first.get("generation") or {})


def _key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def match_prompts(model: GenerationsFile, baseline: GenerationsFile) -> list[tuple[Generation, Generation]]:
    """The two files' rows paired by prompt (a prompt repeated in a file pairs by occurrence)."""
    def keyed(gen: GenerationsFile) -> dict[tuple[str, int], Generation]:
        seen: dict[str, int] = {}
        out = {}
        for row in gen.rows:
            k = _key(row.prompt)
            seen[k] = seen.get(k, 0) + 1
            out[(k, seen[k])] = row
        return out

    ours, theirs = keyed(model), keyed(baseline)
    if ours.keys() != theirs.keys():
        only = next(iter([*(ours.keys() - theirs.keys()), *(theirs.keys() - ours.keys())]))
        where = model.path if only in ours else baseline.path
        raise ValueError(f"{model.path} and {baseline.path} must hold the same prompts ({len(ours)} vs {len(theirs)}); "
                         f"e.g. only {where} has the prompt {only[0][:80]}")
    return [(row, theirs[k]) for k, row in ours.items()]


def _progress(total: int, config: WinrateConfig, desc: str, processes: Processes):
    """A progress bar on the main process; ``bar.update(n)`` counts what every process did alongside."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not config.progress_bar or not processes.is_main)


def _chunked(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def score_file(judge: Judge, gen: GenerationsFile, config: WinrateConfig, processes: Processes | None = None
               ) -> list[list[float | None]]:
    """A pointwise judge's score of every completion, per prompt."""
    processes = processes or Processes()

    def score_chunk(chunk: list[Generation]) -> list[list[float | None]]:
        flat = judge.score([r.prompt for r in chunk for _ in r.completions], [c for r in chunk for c in r.completions])
        bar.update(len(chunk) * processes.count)
        out = []
        for row in chunk:
            out.append(flat[: len(row.completions)])
            flat = flat[len(row.completions) :]
        return out

    with _progress(len(gen.rows), config, f"scoring {Path(gen.path).name}", processes) as bar:
        return [scores for chunk in processes.map(_chunked(gen.rows, config.chunk_size), score_chunk)
                for scores in chunk]


def reward_stats(scores: list[list[float | None]]) -> dict[str, float]:
    given = [s for per_prompt in scores for s in per_prompt if s is not None]
    return {"mean": statistics.fmean(given) if given else math.nan,
            "std": statistics.stdev(given) if len(given) > 1 else math.nan,
            "scored": len(given), "no_result": sum(s is None for per_prompt in scores for s in per_prompt)}


def compare_files(judge: Judge, matched: list[tuple[Generation, Generation]], config: WinrateConfig,
                  processes: Processes | None = None) -> list[list[float | None]]:
    """A pairwise judge's verdicts, P(model's sample k beats the baseline's sample k), per prompt."""
    processes = processes or Processes()

    def compare_chunk(chunk: list[tuple[Generation, Generation]]) -> list[list[float | None]]:
        sizes = [min(len(m.completions), len(b.completions)) for m, b in chunk]
        flat = judge.compare([m.prompt for (m, _), n in zip(chunk, sizes, strict=True) for _ in range(n)],
                             [c for (m, _), n in zip(chunk, sizes, strict=True) for c in m.completions[:n]],
                             [c for (_, b), n in zip(chunk, sizes, strict=True) for c in b.completions[:n]])
        bar.update(len(chunk) * processes.count)
        verdicts = []
        for n in sizes:
            verdicts.append(flat[:n])
            flat = flat[n:]
        return verdicts

    with _progress(len(matched), config, "judging", processes) as bar:
        return [v for chunk in processes.map(_chunked(matched, config.chunk_size), compare_chunk) for v in chunk]


def _kl_section(config: WinrateConfig, gen: GenerationsFile, processes: Processes) -> dict:
    from ..feedback.sampling import load_for_sampling, load_tokenizer_for
    from ..modeling import place

    policy_name = config.kl.policy or gen.model
    if not policy_name:
        raise ConfigError(f"config key 'kl.policy': {gen.path} names no model; say which model sampled it")
    s = gen.settings
    exact = s.get("temperature", 1.0) == 1.0 and s.get("top_p", 1.0) == 1.0 and not s.get("top_k", 0)
    if not exact:
        log.warning("%s was sampled with temperature %s, top_p %s, top_k %s: its samples are not from π itself, so "
                    "the KL estimate is biased (sample with temperature 1, top_p 1, top_k 0 for an unbiased one)",
                    gen.path, s.get("temperature"), s.get("top_p"), s.get("top_k"))
    trust = config.kl.trust_remote_code
    tokenizer = load_tokenizer_for(policy_name, trust, TRUST_KEY)
    if len(load_tokenizer_for(config.kl.reference, trust, TRUST_KEY)) != len(tokenizer):
        raise ValueError(f"kl.reference {config.kl.reference} and the policy {policy_name} have different tokenizers")
    use_template = s.get("chat_template", bool(getattr(tokenizer, "chat_template", None)))
    pairs = [sample_ids(tokenizer, row.prompt, c, use_template, s.get("max_new_tokens"))
             for row in gen.rows for c in row.completions]
    model_cfg = ModelConfig(dtype=config.kl.dtype, trust_remote_code=trust)
    policy = place(load_for_sampling(policy_name, model_cfg, TRUST_KEY), processes.device)
    reference = place(load_for_sampling(config.kl.reference, model_cfg, TRUST_KEY), processes.device)
    with _progress(len(pairs), config, "KL(π‖π_ref)", processes) as bar:
        result = estimate_kl(policy, reference, pairs, tokenizer.pad_token_id, config.kl.batch_size,
                             config.kl.logps_chunk_size, lambda n: bar.update(n * processes.count), processes.map)
    return {"mean": result.mean, "stderr": result.stderr, "samples": result.samples, "policy": policy_name,
            "reference": config.kl.reference, "samples_from_policy": exact}


def _length_tokenizer(config: WinrateConfig, gen: GenerationsFile):
    from ..feedback.sampling import load_tokenizer_for

    name = config.lengths.tokenizer or config.kl.policy or gen.model
    try:
        return load_tokenizer_for(name, config.kl.trust_remote_code, TRUST_KEY) if name else None
    except (OSError, ValueError) as exc:
        log.warning("no tokenizer for length statistics (%s): reporting characters only", exc)
        return None


def evaluate_generations(config: WinrateConfig, judge: Judge | None = None) -> dict:
    """Every configured section (see the module docstring); also written to ``config.output_file``."""
    model = load_generations(config.model_file)
    baseline = load_generations(config.baseline_file) if config.baseline_file else None
    matched = match_prompts(model, baseline) if baseline else None  # a mismatch fails before any judging
    report: dict[str, Any] = {"model_file": model.path, "baseline_file": baseline.path if baseline else None,
                              "prompts": len(model.rows), "samples": sum(len(r.completions) for r in model.rows)}
    processes = Processes()
    if judge is None and config.judge:
        judge = build_judge(config.judge)
    if judge is not None and judge.pointwise:
        scores = {"model": score_file(judge, model, config, processes)}
        if baseline:
            scores["baseline"] = score_file(judge, baseline, config, processes)
        report["reward"] = {name: reward_stats(s) for name, s in scores.items()}
    if judge is not None and baseline:
        if judge.pointwise:  # sample k against sample k; zip stops at the shorter list
            verdicts = [[preference_from_scores(a, b) for a, b in
                         zip(scores["model"][m.position], scores["baseline"][b.position], strict=False)]
                        for m, b in matched]
        else:
            verdicts = compare_files(judge, matched, config, processes)
        b = config.bootstrap
        report["win_rate"] = win_rate(verdicts, b.samples, b.confidence, b.seed).as_dict()
    if config.lengths.enabled:
        tokenizer = _length_tokenizer(config, model)
        report["lengths"] = {"model": length_stats([c for r in model.rows for c in r.completions], tokenizer)}
        if baseline:
            report["lengths"]["baseline"] = length_stats([c for r in baseline.rows for c in r.completions], tokenizer)
    if config.kl.reference:
        report["kl"] = _kl_section(config, model, processes)
    if judge is not None:
        report["judge"] = processes.sum_counts(judge.summary())
        judge.check_usable(f"there is no win rate or reward to report for {model.path}", report["judge"])
    if processes.is_main:
        out = Path(config.output_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    processes.barrier()
    return report


def command(args: argparse.Namespace) -> int:
    """The ``preftune winrate`` handler."""
    config = load_winrate_config(args.config, args.overrides)
    judge = build_judge(config.judge) if config.judge else None  # config errors before any file is read
    if judge is None:
        report = evaluate_generations(config)
    else:
        with judge:
            report = evaluate_generations(config, judge)
    if Processes().is_main:
        print(json.dumps(report, indent=2))
        print(f"written to {config.output_file}")
    return 0
