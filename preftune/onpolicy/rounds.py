"""``preftune iterate CONFIG``: rounds of on-policy preference optimization.

Round t (t = 1 .. ``rounds``) starts from π_{t-1} (π_0 = ``policy``) and runs four stages, each in
``round-t/`` and resumable (``stages.py``):

1. ``samples/`` — K samples per prompt of the round (``prompts_per_round`` consecutive prompts, or all) from
   π_{t-1} (``preftune generate``).
2. ``rows/`` — the judge compares every prompt's samples (``preferences.win_matrices``); each sample's win rate
   against the others, P̂, decides the rows (``selection``):
   - ``iterative_dpo`` (Xu et al. 2023, "Some things are more CRINGE than others"; Yuan et al. 2024,
     "Self-Rewarding Language Models", §2.3): best vs worst (or all pairs), any objective on pairs.
   - ``dno`` (Rosset et al. 2024, "Direct Nash Optimization", Algorithm 2, DNO-Prct): the samples plus an optional
     teacher completion; best vs worst by win rate, kept only above the win-rate margin ``labels.min_margin``;
     DPO with π_{t-1} as the reference (Algorithm 2's contrastive loss, in its DPO form).
   - ``sppo`` (Wu et al. 2024, Algorithm 1): scored rows (prompt, sample, P̂) for the objective ``sppo``
     (Eq. 4.7), reference π_{t-1}.
3. ``train/`` — ``preftune train`` from π_{t-1} on the rows; its ``final/`` (merged, with LoRA) is π_t. The
   reference is π_{t-1} (``reference: round_start``) or π_0 (``initial``; iterative DPO only).
4. ``evaluation/`` — with ``evaluation.prompts_file``: held-out samples of π_t, their mean judge score (or win
   rate against π_0's samples for a pairwise judge) and KL(π_t‖π_0). ``round-0/evaluation`` measures π_0.

``report.json`` and ``report.md`` in ``output_dir`` gather every round. Where the papers leave a choice open
the docstrings of ``selection`` and ``preferences`` say which one was made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

from ..atomic import write_json, write_jsonl, write_text
from ..data import read_rows
from ..feedback.judges import Judge, build_judge
from .preferences import win_matrices, win_rates
from .rounds_config import IterateConfig, check, load_iterate_config, round_training
from .selection import dno_rows, iterative_rows, sppo_rows
from .stages import file_digest, run_stage
from .steps import evaluate_stage, sample_stage, train_stage, uses_template, write_prompts

log = logging.getLogger("preftune")


def prompt_key(prompt) -> str:
    """Text prompts and single-user-turn message prompts with the same text are the same prompt."""
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user":
        prompt = prompt[0]["content"]
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def read_teacher(path: str) -> dict[str, str]:
    """prompt key -> the teacher's completion (text) from prompt/completion rows."""
    teacher = {}
    for row in read_rows(path):
        value = row.value if isinstance(row.value, dict) else {}
        completion = value.get("completion")
        if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
            completion = completion[-1].get("content")
        if "prompt" not in value or not isinstance(completion, str) or not completion.strip():
            raise ValueError(f"{row.source}: a teacher row needs a prompt and a non-empty completion")
        teacher[prompt_key(value["prompt"])] = completion
    return teacher


class Judges:
    """The training and evaluation judges, built on first use (a finished run loads neither)."""

    def __init__(self, config: IterateConfig, train: Judge | None, evaluation: Judge | None):
        self.config, self._train, self._eval = config, train, evaluation

    def train(self) -> Judge:
        if self._train is None:
            self._train = build_judge(self.config.judge)
        return self._train

    def evaluation(self) -> Judge:
        if not self.config.evaluation.judge:
            return self.train()
        if self._eval is None:
            self._eval = build_judge(self.config.evaluation.judge, "evaluation.judge.")
        return self._eval


def rows_for(config: IterateConfig, prompt, texts: list[str], rates: list, counts: Counter) -> list[dict]:
    labels = config.labels
    if config.method == "iterative_dpo":
        return iterative_rows(prompt, texts, rates, labels.pairs, labels.min_margin, counts)
    if config.method == "dno":
        return dno_rows(prompt, texts, rates, labels.min_margin, counts)
    return sppo_rows(prompt, texts, rates, labels.sppo_samples, counts)


def select_stage(folder: Path, config: IterateConfig, samples: Path, judges: Judges) -> Path:
    """Judge the samples and write this round's training rows (``rows.jsonl``) and their summary."""
    from ..feedback.label import read_generations

    output = folder / "rows.jsonl"
    teacher_file = config.labels.teacher_file
    settings = {"method": config.method, "labels": dataclasses.asdict(config.labels), "judge": config.judge,
                "samples": file_digest(samples), "teacher": file_digest(teacher_file) if teacher_file else None}

    def work() -> dict:
        generations = read_generations(samples)
        teacher = read_teacher(teacher_file) if teacher_file else {}
        judge, counts, rows, chosen_rates = judges.train(), Counter(), [], []
        size = config.labels.chunk_size
        for start in range(0, len(generations), size):
            chunk = generations[start : start + size]
            groups = []
            for g in chunk:
                extra = teacher.get(prompt_key(g.prompt))
                counts["teacher_completions"] += extra is not None
                groups.append(list(g.completions) + ([extra] if extra is not None else []))
            matrices, _ = win_matrices(judge, [g.prompt for g in chunk], groups, config.labels.pointwise_as, counts)
            for g, texts, matrix in zip(chunk, groups, matrices, strict=True):
                new = rows_for(config, g.prompt, texts, win_rates(matrix), counts)
                rows += new
                chosen_rates += [r.get("score_chosen", r.get("score")) for r in new]
        if not rows:
            raise ValueError(f"{samples}: the judge preferred no sample to another on any prompt "
                             f"({dict(counts)}); nothing to train on this round")
        write_jsonl(output, rows)
        teacher_chosen = sum(1 for r in rows if "chosen" in r and prompt_key(r["prompt"]) in teacher and
                             teacher[prompt_key(r["prompt"])] == _text(r["chosen"]))
        return {"rows": len(rows), "prompts": len(generations), **dict(counts), "teacher_chosen": teacher_chosen,
                "judge": judge.summary()}

    run_stage(folder, settings, work)
    return output


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _round_prompts(prompts: list, per_round: int | None, round_number: int) -> list:
    if not per_round:
        return prompts
    start = (round_number - 1) * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


def _read_prompts(config: IterateConfig) -> list:
    from ..feedback.generate import PromptsConfig, read_prompts

    p = config.prompts
    return read_prompts(PromptsConfig(file=p.file, columns=p.columns, limit=p.limit))


def run_rounds(config: IterateConfig, judge: Judge | None = None, eval_judge: Judge | None = None) -> dict:
    """Every round (see the module docstring); returns the report (also ``report.json`` and ``report.md``).
    ``judge``/``eval_judge`` replace the configured judges (tests pass function judges)."""
    check(config)
    out, judges = Path(config.output_dir), Judges(config, judge, eval_judge)
    prompts = _read_prompts(config)
    start = initial = config.policy.name_or_path
    use_template = uses_template(initial, config.prompts.chat_template)
    evaluation = _Evaluation(config, out, use_template, judges)
    objective = round_training(config, 1, Path("rows.jsonl"), out).objective
    report = {"method": config.method, "policy": initial, "reference": config.reference,
              "objective": {"name": objective.name, **objective.params},
              "rounds": [{"round": 0, "policy": initial, **evaluation(0, initial)}]}
    for t in range(1, config.rounds + 1):
        folder = out / f"round-{t}"
        prompts_file = write_prompts(folder / "prompts.jsonl", _round_prompts(prompts, config.prompts_per_round, t),
                                     use_template)
        samples = sample_stage(folder / "samples", start, prompts_file, config.sampling, use_template,
                               seed=config.sampling.seed + t - 1, progress=config.progress_bar)
        rows = select_stage(folder / "rows", config, samples, judges)
        trained = train_stage(round_training(config, t, rows, out, start))
        start = trained["final"]
        selected = json.loads((folder / "rows" / "stage.json").read_text())["result"]
        report["rounds"].append({"round": t, "policy": start, "rows": selected, "train": trained["last"],
                                 "train_steps": trained["steps"], **evaluation(t, start)})
    write_json(out / "report.json", report)
    write_text(out / "report.md", format_report(report))
    return report


class _Evaluation:
    def __init__(self, config: IterateConfig, out: Path, use_template: bool, judges: Judges):
        self.config, self.out, self.judges = config, out, judges
        self.prompts_file = None
        if config.evaluation.prompts_file:
            from ..feedback.generate import PromptsConfig, read_prompts

            held_out = read_prompts(PromptsConfig(file=config.evaluation.prompts_file))
            self.prompts_file = write_prompts(out / "evaluation_prompts.jsonl", held_out, use_template)

    def __call__(self, t: int, model: str) -> dict:
        if self.prompts_file is None:
            return {}
        e = self.config.evaluation
        baseline = self.out / "round-0" / "evaluation" / "samples" / "samples.jsonl"
        return {"evaluation": evaluate_stage(
            self.out / f"round-{t}" / "evaluation", model, self.config.policy.name_or_path, e, self.config.sampling,
            self.prompts_file, self.judges.evaluation(), e.judge or self.config.judge,
            baseline if t > 0 else None, self.config.progress_bar)}


def format_report(report: dict) -> str:
    lines = [f"# {report['method']} from {report['policy']}", "",
             f"objective {report['objective']}, reference: {report['reference']}", "",
             "| round | rows | train loss | reward | KL(π‖π_0) | win rate vs π_0 |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rounds"]:
        e = r.get("evaluation") or {}
        reward = f"{e['reward']:.3f} ± {e['reward_stderr']:.3f}" if "reward" in e else "–"
        kl = f"{e['kl']:.3f} ± {e['kl_stderr']:.3f}" if e else "–"
        win = f"{e['win_rate_vs_start']['win_rate']:.3f}" if "win_rate_vs_start" in e else "–"
        loss = f"{r['train']['loss']:.4f}" if r.get("train") else "–"
        lines.append(f"| {r['round']} | {r.get('rows', {}).get('rows', '–')} | {loss} | {reward} | {kl} | {win} |")
    return "\n".join(lines) + "\n"


def command(args: argparse.Namespace) -> int:
    """The ``preftune iterate`` handler."""
    config = load_iterate_config(args.config, args.overrides)
    report = run_rounds(config)
    print(format_report(report))
    print(f"report: {Path(config.output_dir) / 'report.md'}")
    return 0
