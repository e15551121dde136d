"""The stages every on-policy driver is made of, each one preftune command run in-process inside
``stages.run_stage``: sample (``preftune generate``), train (``preftune train``), evaluate (``preftune winrate``'s
reward and KL sections)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from ..atomic import write_jsonl
from ..config import Config, ModelConfig
from ..feedback.judges import Judge
from .config import OnPolicyEvalConfig, OnPolicySamplingConfig
from .stages import file_digest, run_stage

log = logging.getLogger("preftune")


def write_prompts(path: Path, prompts: list, use_template: bool) -> Path:
    """The prompts a stage samples from. With the chat template, text prompts are written as user turns, so
    that the rows built from the samples are conversational and training renders them as sampling did."""
    rows = [{"prompt": [{"role": "user", "content": p}] if use_template and isinstance(p, str) else p}
            for p in prompts]
    write_jsonl(path, rows)
    return path


def uses_template(model: str, chat_template: bool | None) -> bool:
    from ..feedback.sampling import load_tokenizer_for

    if chat_template is not None:
        return chat_template
    return bool(getattr(load_tokenizer_for(model), "chat_template", None))


def sample_stage(folder: Path, model: str, prompts_file: Path, sampling: OnPolicySamplingConfig, use_template: bool,
                 num_samples: int | None = None, seed: int | None = None, progress: bool = False) -> Path:
    """``num_samples`` completions per prompt of ``prompts_file`` from ``model`` into ``folder/samples.jsonl``."""
    from ..feedback.generate import GenerateConfig, PromptsConfig, generate
    from ..feedback.sampling import SamplingConfig

    output = folder / "samples.jsonl"
    config = GenerateConfig(
        model=ModelConfig(name_or_path=model, dtype=sampling.dtype),
        prompts=PromptsConfig(file=str(prompts_file), chat_template=use_template),
        sampling=SamplingConfig(num_samples=num_samples or sampling.num_samples, max_new_tokens=sampling.max_new_tokens,
                                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                seed=sampling.seed if seed is None else seed),
        backend="auto", batch_size=sampling.batch_size, output_file=str(output), progress_bar=progress)
    # what is sampled, not where files are: a finished folder copied elsewhere stays valid (the prompts' content
    # is in the digest)
    settings = {"generate": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("progress_bar", "output_file")},
                "prompts": file_digest(prompts_file)}
    settings["generate"]["prompts"].pop("file")
    run_stage(folder, settings, lambda: {"prompts": generate(config).prompts})
    return output


def train_stage(config: Config) -> dict:
    """One training run (resumable by itself); the result names its ``final`` folder."""
    from ..training import train

    folder = Path(config.training.output_dir)
    settings = dataclasses.asdict(config)
    settings["training"].pop("progress_bar")  # how a run looks, not what it computes
    settings["data_digest"] = file_digest(config.data.train_file)

    def work() -> dict:
        result = train(config)
        if result.interrupted:
            raise KeyboardInterrupt
        rows = [r for r in result.history if "loss" in r]
        return {"final": str(result.final_dir), "steps": result.steps, "last": rows[-1] if rows else {}}

    return run_stage(folder, settings, work)


def evaluate_stage(folder: Path, model: str, start: str, evaluation: OnPolicyEvalConfig, sampling: OnPolicySamplingConfig,
                   prompts_file: Path, judge: Judge, judge_settings: dict, baseline: Path | None,
                   progress: bool = False) -> dict:
    """Held-out samples of ``model`` (temperature 1, top-p 1, float32: exactly from π), their mean judge score
    (pointwise judge) or win rate against ``baseline``'s samples (pairwise judge), and KL(π‖π_start)."""
    from ..evaluation.winrate import KLConfig, WinrateConfig, evaluate_generations

    exact = dataclasses.replace(sampling, temperature=1.0, top_p=1.0, top_k=0, dtype="float32")
    samples = sample_stage(folder / "samples", model, prompts_file, exact, use_template=_template_of(prompts_file),
                           num_samples=evaluation.num_samples, progress=progress)

    def work() -> dict:
        kl = KLConfig(reference=start, policy=model, batch_size=evaluation.kl_batch_size) \
            if evaluation.kl and model != start else KLConfig()
        pairwise = not judge.pointwise and baseline is not None and model != start
        report = evaluate_generations(WinrateConfig(
            model_file=str(samples), baseline_file=str(baseline) if pairwise else None, kl=kl,
            output_file=str(folder / "evaluation.json"), progress_bar=progress), judge)
        point = {"model": model, "samples": report["samples"]}
        if "reward" in report:
            stats = report["reward"]["model"]
            point.update(reward=stats["mean"], reward_stderr=stats["std"] / math.sqrt(stats["scored"]))
        if "win_rate" in report:
            point["win_rate_vs_start"] = report["win_rate"]
        point["kl"] = report["kl"]["mean"] if "kl" in report else 0.0
        point["kl_stderr"] = report["kl"]["stderr"] if "kl" in report else 0.0
        return point

    return run_stage(folder, {"samples": file_digest(samples), "start": start, "kl": evaluation.kl, "judge": judge_settings,
                              "baseline": file_digest(baseline) if baseline else None}, work)


def _template_of(prompts_file: Path) -> bool:
    """Prompts written by ``write_prompts`` are messages exactly when the template is used."""
    first = json.loads(prompts_file.read_text(encoding="utf-8").splitlines()[0])
    return isinstance(first["prompt"], list)
