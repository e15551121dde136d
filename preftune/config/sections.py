"""The config sections: one dataclass per section, the names users write in a recipe, each with its default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration problem, reported with the dotted key it concerns."""


@dataclass
class ModelConfig:
    name_or_path: str = ""  # a Hugging Face model folder (or hub name when online)
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype the weights are loaded in
    gradient_checkpointing: bool = False
    dropout: bool = False  # keep the model's dropout; off by default so policy and reference see the same net
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    # QLoRA: load the base weights through bitsandbytes (4bit: NF4 with double quantization) and train LoRA
    # adapters on top; needs lora.enabled. The matmuls compute in training.precision's dtype.
    quantization: Literal["4bit", "8bit"] | None = None


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    save: Literal["adapter", "merged"] = "adapter"  # what final/ holds


@dataclass
class ReferenceConfig:
    name_or_path: str | None = None  # default: a frozen copy of the starting model (adapters off with LoRA)
    precompute: bool = False  # compute reference log-probs once, cache on disk, free the reference model
    cache_dir: str = "~/.cache/preftune/reference"
    # TR-DPO (Gorbatovski et al. 2024): every sync_steps optimizer steps, ref <- alpha * policy + (1 - alpha) * ref
    sync_steps: int | None = None
    sync_alpha: float = 1.0  # 1.0 = hard update; the paper's soft updates use e.g. 0.6


@dataclass
class DataConfig:
    # .jsonl, .json, .parquet, .csv, a datasets folder (save_to_disk, or data files), or a hub dataset name
    # (owner/name), read offline-first from the local datasets cache
    train_file: str = ""
    eval_file: str | None = None
    eval_fraction: float = 0.0  # held out from train_file when eval_file is not given
    split: str | None = None  # a dataset's split to train on (any name: train_prefs); default train
    eval_split: str | None = None  # held-out split (of eval_file, else of train_file); default test/validation
    subset: str | None = None  # a dataset's configuration (load_dataset's second argument)
    data_dir: str | None = None  # a dataset's folder of data files (load_dataset's data_dir)
    # canonical name -> column in the file, or a path into nested fields: info.post, summaries[choice].text
    columns: dict[str, str] = field(default_factory=dict)
    row_mapper: str | None = None  # "module:function" or "file.py:function" rewriting each row (a dict) first
    # read rows from disk when needed instead of holding the file in memory (.jsonl, .parquet, datasets)
    streaming: bool = False
    max_length: int | None = 1024  # prompt + completion tokens
    max_prompt_length: int | None = 512  # the prompt keeps its end; unset: 512 or max_length // 2 if smaller
    on_invalid: Literal["error", "skip"] = "error"  # skip: bad rows are counted and written to a report
    strict_truncation: bool = False  # a pair whose completion truncation empties is an error, not a drop
    max_errors_reported: int = 20
    chat_template: bool | None = None  # None: use it for conversational rows only
    # A retain set (prompt/completion or messages) whose mean token NLL, times objective.retain_weight, is
    # added to the loss (NPO+RT); any objective can use it
    retain_file: str | None = None
    # Ranked lists (prompt, completions, scores|ranks) feeding an objective on pairs become pairs:
    ranked_to_pairs: Literal["all_pairs", "best_vs_worst", "best_vs_each"] | None = None


@dataclass
class ObjectiveConfig:
    name: str = "dpo"
    rpo_alpha: float = 0.0  # weight of the chosen NLL term added to any paired objective (RPO)
    ld_alpha: float | None = None  # LD-DPO: weight of the tokens past the shorter completion's length
    wpo: bool = False  # WPO: weight each pair by the policy's probability of generating it
    weight: float = 1.0  # weight of this objective when a mixture adds others
    retain_weight: float = 1.0  # λ of the retain-set NLL term (with data.retain_file)
    mixture: list[dict] = field(default_factory=list)  # more objectives to add: [{name: sft, weight: 0.5}, ...]
    params: dict[str, Any] = field(default_factory=dict)  # written flat in YAML: objective.beta, ...

    def plan(self):
        """The ``ObjectivePlan`` this section describes, built (and every parameter checked) once: validation
        builds it, and the run, its stages and its export reuse it while the section is unchanged."""
        from ..objectives.plan import build_plan

        key = repr(dataclasses.astuple(self))
        cached = self.__dict__.get("_plan")
        if cached is None or cached[0] != key:
            plan = build_plan(self.name, self.params, rpo_alpha=self.rpo_alpha, ld_alpha=self.ld_alpha, wpo=self.wpo,
                              weight=self.weight, mixture=self.mixture)
            self.__dict__["_plan"] = cached = (key, plan)
        return cached[1]


@dataclass
class LoopConfig:
    """What the training loop itself needs, for every task it trains (policies, reward models)."""

    output_dir: str = "runs/preftune"
    seed: int = 42
    batch_size: int = 8  # examples (pairs, lists, ...) per device per micro-batch
    eval_batch_size: int = 16  # per process, like batch_size (with N processes an evaluation batch holds N x this)
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-7
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    max_grad_norm: float | None = 1.0
    # bf16: autocast (AMX on recent CPUs); fp16: autocast + gradient scaler, GPUs only
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate at the end only (when there is a held-out split)
    eval_before_training: bool = True
    save_steps: int | None = 500
    save_total_limit: int | None = 2
    resume: str = "auto"  # auto | never | path to a checkpoint folder
    progress_bar: bool = True
    # experiment trackers, through accelerate, with the metric names of metrics.jsonl
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(
        default_factory=lambda: ["tensorboard"])
    tensorboard: bool = True  # false leaves tensorboard out of report_to
    tracker_project: str = "preftune"  # wandb / trackio project, mlflow experiment, tensorboard/<project>/
    tracker_kwargs: dict[str, Any] = field(default_factory=dict)  # per tracker: {wandb: {mode: offline}, ...}


@dataclass
class TrainingConfig(LoopConfig):
    # sDPO: N consecutive parts of the train split (or a list of files), each stage's model the next's reference
    stages: int | list[str] | None = None
    logps_chunk_size: int = 1024  # completion positions projected to the vocabulary at once (fewer if vocab > 8k)
    # How rows go through the model (training/packing.py): prefix_shared computes each prompt once for all its
    # completions, without padding; padding_free only drops the padding; padded is the plain batch. Every
    # mode gives the same log-probs; models whose attention cannot be packed run padded.
    packing: Literal["prefix_shared", "padding_free", "padded"] = "prefix_shared"
    # at each evaluation, greedy generations for this many fixed held-out prompts -> samples.jsonl + trackers
    sample_prompts: int = 0
    sample_max_new_tokens: int = 64


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
