"""``preftune zephyr CONFIG``: the Zephyr recipe (Tunstall et al. 2023, "Zephyr: Direct Distillation of LM
Alignment", §2): distilled SFT, AI feedback from a pool of models, distilled DPO.

Stages under ``output_dir`` (each resumable and fingerprinted, ``onpolicy.stages``):

1. ``teacher/`` — the teacher answers every SFT prompt (dSFT data, §2 "Distilled Supervised Fine-Tuning").
2. ``sft/`` — the student is fine-tuned on those answers (``preftune sft``).
3. ``pool/NAME/`` — every model of ``pool`` answers every preference prompt (``sft`` = the distilled student,
   ``teacher`` = the teacher, or any model folder / name), like UltraFeedback's four models per prompt.
4. ``pairs/`` — ``preftune label`` over those files pooled per prompt (each row records which model wrote what):
   the judge scores every completion, the best one is chosen and one of the others drawn at random is rejected
   (§2 "AI Feedback through Preferences": "we select the highest mean score as the chosen response and one of
   the remaining three at random as rejected").
5. ``dpo/`` — DPO (β 0.1 unless the recipe says otherwise) from the dSFT model, which is also the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_jsonl
from ..config import ConfigError, ModelConfig, load_section
from ..feedback.judges import judge_config
from ..onpolicy.config import (
    OnPolicyPromptsConfig,
    OnPolicySamplingConfig,
    check_sampling,
    resolve_file,
    training_config,
)
from ..onpolicy.stages import file_digest, run_stage
from ..onpolicy.steps import sample_stage, train_stage, uses_template, write_prompts


@dataclass
class ZephyrConfig:
    output_dir: str = "runs/zephyr"
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    sft_prompts: OnPolicyPromptsConfig = field(default_factory=OnPolicyPromptsConfig)
    preference_prompts: OnPolicyPromptsConfig = field(default_factory=OnPolicyPromptsConfig)
    teacher_sampling: OnPolicySamplingConfig = field(
        default_factory=lambda: OnPolicySamplingConfig(num_samples=1, temperature=0.7, top_p=0.95))
    pool: list[str] = field(default_factory=lambda: ["sft", "teacher"])  # who answers the preference prompts
    pool_sampling: OnPolicySamplingConfig = field(
        default_factory=lambda: OnPolicySamplingConfig(num_samples=1, temperature=0.7, top_p=0.95))
    judge: dict[str, Any] = field(default_factory=dict)
    label_seed: int = 0  # the random "other" of best_vs_random
    sft: dict[str, Any] = field(default_factory=dict)  # a `preftune sft` recipe fragment (training, lora, data)
    dpo: dict[str, Any] = field(default_factory=lambda: {"objective": {"name": "dpo", "beta": 0.1}})
    progress_bar: bool = True


def check(config: ZephyrConfig) -> None:
    for key in ("student", "teacher"):
        if not getattr(config, key).name_or_path:
            raise ConfigError(f"config key '{key}.name_or_path' is not set")
    for key in ("sft_prompts", "preference_prompts"):
        if not getattr(config, key).file:
            raise ConfigError(f"config key '{key}.file' is not set")
    if len(config.pool) < 2 and config.pool_sampling.num_samples < 2:
        raise ConfigError("config key 'pool': a preference needs two completions per prompt (two models, or "
                          "pool_sampling.num_samples >= 2)")
    if not config.judge:
        raise ConfigError("config section 'judge' is missing; it needs at least a 'type'")
    judge_config(config.judge)
    check_sampling(config.teacher_sampling, "teacher_sampling")
    check_sampling(config.pool_sampling, "pool_sampling")
    if len(set(config.pool)) != len(config.pool):
        raise ConfigError(f"config key 'pool': a model is listed twice: {config.pool}")
    for key, section in (("sft", config.sft), ("dpo", config.dpo)):
        if "model" in section or (section.get("data") or {}).get("train_file"):
            raise ConfigError(f"config keys '{key}.model' and '{key}.data.train_file' are set by the driver")
    _sft_config(config, Path("sft.jsonl"), Path(config.output_dir))
    plan = _dpo_config(config, Path("pairs.jsonl"), Path(config.output_dir), "sft").objective.plan()
    if "pairs" not in plan.shapes:
        raise ConfigError(f"config key 'dpo.objective.name': {plan.name!r} does not train on pairs")


def _sft_config(config: ZephyrConfig, rows: Path, out: Path):
    sft = {**config.sft, "objective": {"name": "sft"}}
    return training_config(sft, "sft", model__name_or_path=config.student.name_or_path,
                           model__dtype=config.student.dtype, data__train_file=str(rows),
                           training__output_dir=str(out / "sft"), training__progress_bar=config.progress_bar,
                           **({"lora__save": "merged"} if (config.sft.get("lora") or {}).get("enabled") else {}))


def _dpo_config(config: ZephyrConfig, pairs: Path, out: Path, start: str):
    return training_config(config.dpo, "dpo", model__name_or_path=start, model__dtype=config.student.dtype,
                           data__train_file=str(pairs), training__output_dir=str(out / "dpo"),
                           training__progress_bar=config.progress_bar, reference__name_or_path=None)


def load_zephyr_config(path: str | Path, overrides: list[str] = ()) -> ZephyrConfig:
    config = load_section(ZephyrConfig, path, overrides, check)
    for section in (config.sft_prompts, config.preference_prompts):
        section.file = resolve_file(Path(path).parent, section.file)
    return config


def _prompts(section: OnPolicyPromptsConfig) -> list:
    from ..feedback.generate import PromptsConfig, read_prompts

    return read_prompts(PromptsConfig(file=section.file, columns=section.columns, limit=section.limit))


def sft_rows(generations: Path) -> list[dict]:
    """dSFT data: each prompt with the teacher's (non-blank) answer, as a conversation or prompt/completion."""
    rows = []
    for line in generations.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for text in row["completions"]:
            if not text.strip():
                continue
            prompt = row["prompt"]
            rows.append({"messages": [*prompt, {"role": "assistant", "content": text}]} if isinstance(prompt, list)
                        else {"prompt": prompt, "completion": text})
    return rows


def run_zephyr(config: ZephyrConfig, judge=None) -> dict:
    """Every stage; ``judge`` replaces the configured one (tests)."""
    from ..feedback.label import LabelConfig, label

    check(config)
    out = Path(config.output_dir)
    teacher, student = config.teacher.name_or_path, config.student.name_or_path
    template = uses_template(student, config.sft_prompts.chat_template)
    sft_prompts = write_prompts(out / "teacher" / "prompts.jsonl", _prompts(config.sft_prompts), template)
    answers = sample_stage(out / "teacher", teacher, sft_prompts, config.teacher_sampling, template,
                           progress=config.progress_bar)
    sft_file = out / "sft_data.jsonl"
    write_jsonl(sft_file, sft_rows(answers))
    sft = train_stage(_sft_config(config, sft_file, out))
    models = {"sft": sft["final"], "teacher": teacher}
    template = uses_template(student, config.preference_prompts.chat_template)
    pref_prompts = write_prompts(out / "pool" / "prompts.jsonl", _prompts(config.preference_prompts), template)
    files = [str(sample_stage(out / "pool" / Path(name).name, models.get(name, name), pref_prompts,
                              config.pool_sampling, template, progress=config.progress_bar)) for name in config.pool]
    pairs = out / "pairs" / "pairs.jsonl"
    labelling = LabelConfig(input_files=files, output_file=str(pairs), format="best_vs_random", seed=config.label_seed,
                            judge=config.judge, progress_bar=config.progress_bar)

    def work() -> dict:
        summary = label(labelling, judge)
        if not summary["rows_written"]:
            raise ValueError(f"{pairs}: the judge preferred no completion on any prompt; nothing to train DPO on")
        return summary

    labelled = run_stage(out / "pairs", {"label": dataclasses.asdict(labelling), "inputs": [file_digest(f) for f in files]},
                         work)
    dpo = train_stage(_dpo_config(config, pairs, out, sft["final"]))
    return {"sft": sft, "pairs": labelled, "dpo": dpo}


def command(args: argparse.Namespace) -> int:
    """The ``preftune zephyr`` handler."""
    result = run_zephyr(load_zephyr_config(args.config, args.overrides))
    print(f"dSFT model: {result['sft']['final']}\n{result['pairs']['rows_written']} preference pairs\n"
          f"dDPO model: {result['dpo']['final']}")
    return 0
