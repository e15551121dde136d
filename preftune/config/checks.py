"""Checks across fields of a checked config (what a type alone cannot say), before any model loads."""

from __future__ import annotations

from .sections import Config, ConfigError, LoopConfig


def _positive(key: str, value: float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"config key '{key}': must be > 0, got {value!r}")


def validate_loop(t: LoopConfig, section: str = "training") -> None:
    """The loop's own settings, for any task's ``training`` section."""
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
        _positive(f"{section}.{key}", getattr(t, key), allow_none=False)
    for key in ("max_steps", "eval_steps", "save_steps", "save_total_limit", "max_grad_norm"):
        _positive(f"{section}.{key}", getattr(t, key))
    _positive(f"{section}.learning_rate", t.learning_rate, allow_none=False)
    _positive(f"{section}.epochs", t.epochs, allow_none=False)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"config key '{section}.warmup_ratio': must be in [0, 1), got {t.warmup_ratio}")
    unknown = sorted(set(t.tracker_kwargs) - {"tensorboard", "wandb", "mlflow", "trackio"})
    if unknown or not all(isinstance(v, dict) for v in t.tracker_kwargs.values()):
        raise ConfigError(f"config key '{section}.tracker_kwargs': expected a mapping from tensorboard, wandb, "
                          f"mlflow or trackio to that tracker's arguments, got {t.tracker_kwargs!r}")
    if t.warmup_steps < 0:
        raise ConfigError(f"config key '{section}.warmup_steps': must be >= 0, got {t.warmup_steps}")


def _check_quantization(config: Config) -> None:
    quantization = config.model.quantization
    if quantization is None:
        return
    if not config.lora.enabled:
        raise ConfigError(f"config key 'model.quantization' is {quantization!r} but lora.enabled is false: quantized "
                          "weights cannot be trained, so QLoRA trains LoRA adapters on top; set lora.enabled: true")
    if config.lora.save == "merged":
        raise ConfigError("config key 'lora.save': merged would fold the adapter into rounded (quantized) weights; "
                          "with model.quantization save the adapter (lora.save: adapter): final/ names the "
                          "unquantized base, into which it can be merged afterwards")
    if config.training.stages:
        raise ConfigError("config key 'training.stages': sDPO merges each stage's adapter into the model the next "
                          "stage starts from, which model.quantization would round; run the stages unquantized")


def validate(config: Config) -> None:
    """Cross-field checks; the objective's own parameters are validated by its parameter type."""
    t, d = config.training, config.data
    validate_loop(t)
    _positive("training.logps_chunk_size", t.logps_chunk_size, allow_none=False)
    _positive("training.sample_max_new_tokens", t.sample_max_new_tokens, allow_none=False)
    if t.sample_prompts < 0:
        raise ConfigError(f"config key 'training.sample_prompts': must be >= 0, got {t.sample_prompts}")
    if isinstance(t.stages, int) and t.stages < 1:
        raise ConfigError(f"config key 'training.stages': must be >= 1 or a list of data files, got {t.stages}")
    for key in ("max_length", "max_prompt_length", "max_errors_reported"):
        _positive(f"data.{key}", getattr(d, key))
    if d.max_length and d.max_prompt_length and d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"config key 'data.max_prompt_length' ({d.max_prompt_length}) must be smaller than "
            f"'data.max_length' ({d.max_length}) so that completions keep at least one token"
        )
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"config key 'data.eval_fraction': must be in [0, 1), got {d.eval_fraction}")
    if d.eval_file and d.eval_fraction:
        raise ConfigError("give either 'data.eval_file' or 'data.eval_fraction', not both")
    if d.eval_split and d.eval_fraction:
        raise ConfigError("give either 'data.eval_split' or 'data.eval_fraction', not both")
    if d.streaming and d.ranked_to_pairs:
        raise ConfigError("'data.streaming' reads one row per example, but 'data.ranked_to_pairs' makes several "
                          "pairs of each row: turn one of them off")
    if d.streaming and isinstance(t.stages, int):
        raise ConfigError("'data.streaming' with 'training.stages: N': the stage files are cut from rows held in "
                          "memory; give the stages as a list of files, or turn streaming off")
    _positive("lora.r", config.lora.r, allow_none=False)
    _check_quantization(config)
    _positive("reference.sync_steps", config.reference.sync_steps)
    if not 0 < config.reference.sync_alpha <= 1:
        raise ConfigError(f"config key 'reference.sync_alpha': must be in (0, 1], got {config.reference.sync_alpha}")
    try:
        objective = config.objective.plan()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config section 'objective': {exc}") from exc
    if config.reference.precompute and objective.needs_live_reference:
        raise ConfigError(
            f"objective {objective.name!r} looks at the reference token by token or on rows built per batch, "
            "but reference.precompute caches one sum per completion: set reference.precompute=false"
        )
    if config.objective.retain_weight < 0:
        raise ConfigError(f"config key 'objective.retain_weight': must be >= 0, got {config.objective.retain_weight}")
    if config.reference.sync_steps and config.reference.precompute:
        raise ConfigError("reference.sync_steps (TR-DPO) updates the reference during training, so its log-probs "
                          "cannot be precomputed: set reference.precompute=false")
