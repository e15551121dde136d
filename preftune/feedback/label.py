"""``preftune label CONFIG``: generations + a judge -> preference data (the Zephyr / UltraFeedback recipe).

Each prompt's completions (from ``preftune generate``) are scored by the judge: a pointwise judge scores
each one; a pairwise judge compares every two (K(K-1)/2 comparisons) and a completion's score is its mean
probability of beating the others. Repeated completions are judged once, blank ones not at all. Then:

- ``best_vs_worst``: one pair per prompt, the highest against the lowest score.
- ``best_vs_random``: the highest against one drawn at random (seeded) among those scored below it.
- ``all_pairs``: every two completions whose scores differ, the higher one chosen.
- ``ranked``: ``prompt``, ``completions`` (best first), ``scores``.
- ``unpaired``: ``prompt``, ``completion``, ``label`` (score above ``threshold``, or above the prompt's
  median when no threshold is set) and ``score``; a completion exactly at the threshold is a tie.

Two scores within ``min_margin`` of each other are a tie: the pair is skipped and counted; a prompt whose
completions all tie gives no pair and is counted. Text prompts give text rows, message prompts
conversational ones (each completion as a one-message assistant turn), as the training data loader wants; a
text prompt that `generate` sampled through the chat template gives conversational rows too (the prompt as the
user's message), so that training renders each prompt exactly as it was sampled. Pairs carry ``score_chosen`` and
``score_rejected`` too. A summary is printed and written beside the output, named after it (``pairs.jsonl`` ->
``pairs.summary.json``).

Under ``accelerate launch`` / ``torchrun`` the judge's chunks are shared out over the processes (``shards``);
the scores come back in order, and the main process writes the same files one process writes. Rerunning a
job is cheap through the judges' reply cache (SQLite, shared safely by the processes).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..atomic import write_json, write_jsonl
from ..config import ConfigError, beside, load_section
from ..data import DataValidationError, read_rows
from ..data.fields import Fields, read_content
from ..data.report import format_problems
from .judges import Judge, build_judge, compare_within_groups, score_groups
from .shards import Processes

# always in the summary, zeros included, so that "no ties" is visibly a count of 0
COUNTS = ("empty_completions", "duplicate_completions", "unscored_completions", "prompts_too_few_scored",
          "all_tied_prompts", "tied_pairs", "tied_completions")


@dataclass
class LabelConfig:
    input_file: str = ""  # the JSONL written by `preftune generate`
    # or several, one per model (Zephyr): each prompt's completions are pooled and every row records which
    # model wrote what (chosen_model / rejected_model, models, model)
    input_files: list[str] = field(default_factory=list)
    output_file: str = "runs/labelled/pairs.jsonl"
    format: Literal["best_vs_worst", "best_vs_random", "all_pairs", "ranked", "unpaired"] = "best_vs_worst"
    threshold: float | None = None  # unpaired: label = score > threshold; null: above the prompt's median
    min_margin: float = 0.0  # pairs scored within this of each other are ties
    seed: int = 0  # best_vs_random's draw
    chunk_size: int = 32  # prompts per judge call; the progress bar moves per chunk
    progress_bar: bool = True
    judge: dict[str, Any] = field(default_factory=dict)  # `type:` plus that judge's keys


@dataclass
class Generation:
    source: str  # "generations.jsonl:12"
    position: int  # 0-based row number in the file: seeds best_vs_random's draw for this prompt
    prompt: str | list[dict]
    completions: list[str]
    templated: bool = False  # sampled with the chat template (`generation.chat_template` of the row)
    models: list[str] | None = None  # pooled files: the model that wrote each completion

    @property
    def row_prompt(self) -> str | list[dict]:
        """The prompt as the rows written from it carry it: a text prompt that was sampled through the chat
        template becomes the user's message, so that training renders it as sampling did."""
        if self.templated and isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return self.prompt


def _check(config: LabelConfig) -> None:
    if bool(config.input_file) == bool(config.input_files):
        raise ConfigError("config keys 'input_file' / 'input_files': give the generations file to label, or a list "
                          "of them (one per model), not both")
    if not config.judge:
        raise ConfigError("config section 'judge' is missing; it needs at least a 'type'")
    if config.min_margin < 0 or config.chunk_size <= 0:
        raise ConfigError("config keys 'min_margin' must be >= 0 and 'chunk_size' > 0")


def load_label_config(path: str | Path, overrides: list[str] = ()) -> LabelConfig:
    config = load_section(LabelConfig, path, overrides, _check)
    config.input_file = beside(Path(path).parent, config.input_file)  # as the training recipes resolve data files
    config.input_files = [beside(Path(path).parent, f) for f in config.input_files]
    return config


def read_generations(path: str | Path) -> list[Generation]:
    """Rows with a prompt (text or messages) and a list of completion strings; every problem is reported."""
    rows, problems = [], []
    for row in read_rows(path):
        found: list[str] = []
        if row.problem is not None:
            found.append(row.problem)
        elif not isinstance(row.value, dict):
            found.append("expected an object with 'prompt' and 'completions'")
        else:
            prompt = read_content(Fields(row.value, {}), "prompt", found)
            completions = row.value.get("completions")
            if not (isinstance(completions, list) and completions and all(isinstance(c, str) for c in completions)):
                found.append("field 'completions': expected a non-empty list of strings")
            if not found:
                templated = bool((row.value.get("generation") or {}).get("chat_template"))
                rows.append(Generation(row.source, len(rows), prompt, completions, templated))
        problems += [f"{row.source}: {p}" for p in found]
    if problems:
        raise DataValidationError(format_problems(f"{len(problems)} problems in the generations file:", problems, 20))
    return rows


def pool_generations(paths: list[str]) -> list[Generation]:
    """Several generation files (one per model) pooled per prompt, in the first file's prompt order (prompts
    only later files have follow); ``models`` names each completion's model (the file's ``model`` field, or
    the file name when it has none)."""
    pooled: dict[str, Generation] = {}
    for path in paths:
        names = [r.value.get("model") if isinstance(r.value, dict) else None for r in read_rows(path)]
        for gen, name in zip(read_generations(path), names, strict=True):
            model = name or Path(path).stem
            key = json.dumps(gen.prompt, sort_keys=True, ensure_ascii=False)
            if key not in pooled:
                pooled[key] = Generation(gen.source, len(pooled), gen.prompt, [], gen.templated, models=[])
            pooled[key].completions.extend(gen.completions)
            pooled[key].models.extend([model] * len(gen.completions))
    return list(pooled.values())


def _with_models(row: dict, gen: Generation) -> dict:
    """Which model wrote each completion of ``row`` (several names, joined by commas, when they wrote the same)."""
    owners: dict[str, list[str]] = {}
    for text, model in zip(gen.completions, gen.models or [], strict=False):
        owners.setdefault(text, [])
        if model not in owners[text]:
            owners[text].append(model)

    def who(completion) -> str:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        return ",".join(owners.get(text, []))

    if "chosen" in row:
        return {**row, "chosen_model": who(row["chosen"]), "rejected_model": who(row["rejected"])}
    if "completions" in row:
        return {**row, "models": [who(c) for c in row["completions"]]}
    return {**row, "model": who(row["completion"])}


def candidates(gen: Generation, counts: Counter) -> list[str]:
    """The completions worth judging: each distinct non-blank text once, in order."""
    seen: dict[str, None] = {}
    for text in gen.completions:
        if not text.strip():
            counts["empty_completions"] += 1
        elif text in seen:
            counts["duplicate_completions"] += 1
        else:
            seen[text] = None
    return list(seen)


def score_chunk(judge: Judge, prompts: list, texts: list[list[str]]) -> list[list[float | None]]:
    """Scores for every prompt's candidate texts (see the module docstring for pairwise judges)."""
    if judge.pointwise:
        return score_groups(judge, prompts, texts)
    pairs = [(k, i, j) for k, ts in enumerate(texts) for i in range(len(ts)) for j in range(i + 1, len(ts))]
    probs = compare_within_groups(judge, prompts, pairs, texts)
    wins: list[list[list[float]]] = [[[] for _ in ts] for ts in texts]
    for (k, i, j), p in zip(pairs, probs, strict=True):
        if p is not None:
            wins[k][i].append(p)
            wins[k][j].append(1.0 - p)
    return [[sum(w) / len(w) if w else None for w in per_prompt] for per_prompt in wins]


def _as_completion(prompt: str | list[dict], text: str) -> str | list[dict]:
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _pair(prompt, chosen: tuple[str, float], rejected: tuple[str, float]) -> dict:
    return {"prompt": prompt, "chosen": _as_completion(prompt, chosen[0]), "rejected": _as_completion(prompt, rejected[0]),
            "score_chosen": chosen[1], "score_rejected": rejected[1]}


def _pairs(config: LabelConfig, prompt, scored: list[tuple[str, float]], rng: random.Random, counts: Counter) -> list[dict]:
    # max/min keep the first of equal scores, so the choice among tied completions follows file order
    best, worst = max(scored, key=lambda c: c[1]), min(scored, key=lambda c: c[1])
    if config.format == "best_vs_worst":
        return [_pair(prompt, best, worst)]
    if config.format == "best_vs_random":
        below = [c for c in scored if best[1] - c[1] > config.min_margin]
        return [_pair(prompt, best, rng.choice(below))]
    rows = []
    for i, a in enumerate(scored):
        for b in scored[i + 1 :]:
            if abs(a[1] - b[1]) <= config.min_margin:
                counts["tied_pairs"] += 1
            else:
                rows.append(_pair(prompt, a, b) if a[1] > b[1] else _pair(prompt, b, a))
    return rows


def _unpaired(config: LabelConfig, prompt, scored: list[tuple[str, float]], counts: Counter) -> list[dict]:
    threshold = config.threshold if config.threshold is not None else statistics.median(s for _, s in scored)
    rows = []
    for text, score in scored:
        if score == threshold:
            counts["tied_completions"] += 1
            continue
        rows.append({"prompt": prompt, "completion": _as_completion(prompt, text), "label": score > threshold,
                     "score": score})
    return rows


def label_rows(config: LabelConfig, gen: Generation, texts: list[str], scores: list[float | None],
               counts: Counter) -> list[dict]:
    """The output rows of one prompt; ties, unscored completions and empty prompts are counted."""
    counts["unscored_completions"] += sum(s is None for s in scores)
    scored = [(t, s) for t, s in zip(texts, scores, strict=True) if s is not None]
    rng = random.Random(f"{config.seed}:{gen.position}")
    if len(scored) < (1 if config.format == "unpaired" else 2):
        counts["prompts_too_few_scored"] += 1
        return []
    values = [s for _, s in scored]
    tied = max(values) - min(values) <= (0.0 if config.format == "unpaired" else config.min_margin)
    if tied and len(scored) > 1:
        counts["all_tied_prompts"] += 1
    prompt = gen.row_prompt
    if config.format == "unpaired":
        return _unpaired(config, prompt, scored, counts)
    if tied:
        return []
    if config.format == "ranked":
        ordered = sorted(scored, key=lambda c: -c[1])  # stable: equal scores keep file order
        return [{"prompt": prompt, "completions": [_as_completion(prompt, t) for t, _ in ordered],
                 "scores": [s for _, s in ordered]}]
    return _pairs(config, prompt, scored, rng, counts)


def summary_path(output: Path) -> Path:
    """The summary beside an output file, named after it, so that two outputs in one folder keep theirs."""
    return output.with_name(f"{output.name.split('.')[0]}.summary.json")


def label(config: LabelConfig, judge: Judge | None = None) -> dict:
    """Label the generations file; returns the summary (also written beside the output, see ``summary_path``)."""
    from tqdm.auto import tqdm

    generations = pool_generations(config.input_files) if config.input_files else read_generations(config.input_file)
    processes = Processes()
    own_judge = judge is None
    judge = build_judge(config.judge) if own_judge else judge
    chunks = [generations[start : start + config.chunk_size] for start in range(0, len(generations), config.chunk_size)]
    bar = tqdm(total=len(generations), desc="labelling", unit="prompt",
               disable=not config.progress_bar or not processes.is_main)

    def judge_chunk(chunk: list[Generation]) -> list[list[float | None]]:
        scores = score_chunk(judge, [g.prompt for g in chunk], [candidates(g, Counter()) for g in chunk])
        bar.update(len(chunk) * processes.count)  # the other processes judge alongside
        return scores

    try:
        scores = processes.map(chunks, judge_chunk)
        judge_summary = processes.sum_counts(judge.summary())
    finally:
        bar.close()
        if own_judge:
            judge.close()
    counts: Counter = Counter(dict.fromkeys(COUNTS, 0))
    rows: list[dict] = []
    for chunk, chunk_scores in zip(chunks, scores, strict=True):
        for gen, ss in zip(chunk, chunk_scores, strict=True):
            new = label_rows(config, gen, candidates(gen, counts), ss, counts)
            rows += [_with_models(r, gen) for r in new] if gen.models else new
    if not rows:
        judge.check_usable(f"no rows were written to {config.output_file}", judge_summary)
        counted = ", ".join(f"{k}: {v}" for k, v in counts.items() if v) or "nothing scored"
        raise ValueError(f"{config.input_file or ', '.join(config.input_files)}: labelling gave no {config.format} rows to write ({counted}); "
                         f"nothing was written to {config.output_file}")
    output = Path(config.output_file)
    summary = {"input_file": str(config.input_file) if config.input_file else [str(f) for f in config.input_files],
               **_flip_rate(rows, judge),
               "output_file": str(output), "format": config.format,
               "prompts": len(generations), "completions": sum(len(g.completions) for g in generations),
               "rows_written": len(rows), **dict(counts), "judge": judge_summary}
    if processes.is_main:
        write_jsonl(output, rows)
        write_json(summary_path(output), summary)
    processes.barrier()  # the files exist for every process once label() returns
    return summary


def _flip_rate(rows: list[dict], judge: Judge) -> dict:
    """With a probabilistic pairwise judge and two completions per prompt, a pair's score_rejected is the
    judge's probability that the hard label is the wrong way round: its mean is the label-noise rate ε that
    cDPO / robust DPO take as ``objective.label_smoothing`` (Mitchell 2023; Chowdhury et al. 2024)."""
    scored = [r for r in rows if "score_rejected" in r]
    if judge.pointwise or not scored:
        return {}
    return {"expected_flip_rate": statistics.fmean(r["score_rejected"] / (r["score_chosen"] + r["score_rejected"])
                                                   for r in scored)}


def format_summary(summary: dict) -> str:
    lines = [f"{summary['rows_written']} rows ({summary['format']}) from {summary['prompts']} prompts -> "
             f"{summary['output_file']}"]
    lines += [f"  {key:28s} {value}" for key, value in summary.items()
              if isinstance(value, int) and key not in ("rows_written", "prompts")]
    lines += [f"  judge {key:22s} {value}" for key, value in summary["judge"].items()]
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """The ``preftune label`` handler."""
    config = load_label_config(args.config, args.overrides)
    judge = build_judge(config.judge)  # before reading anything large: config errors come first
    with judge:
        summary = label(config, judge)
    if Processes().is_main:
        print(format_summary(summary))
        print(f"summary: {summary_path(Path(summary['output_file']))}")
    return 0
