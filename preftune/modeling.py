"""Loading the policy, its tokenizer and a reference model from a Hugging Face folder (or hub name), and the
accelerator a run computes with.

A model folder is data: its config, weights and tokenizer are read, but Python modules it ships (``auto_map``
in its config) run only when the config says ``trust_remote_code: true``. transformers is always told
``trust_remote_code`` explicitly (left unset, it would ask on the terminal), and its refusal becomes one
line naming preftune's key.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .config import Config, ConfigError, LoraConfig, ModelConfig

log = logging.getLogger("preftune")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TRUST_KEY = "model.trust_remote_code"  # where most commands keep it; callers with another section pass theirs


def resolve(name_or_path: str) -> str:
    """Built-in model names (``builtin:...``) resolve to a local folder; everything else is unchanged."""
    if name_or_path.startswith("builtin:"):
        from .assets import resolve_model_path

        return resolve_model_path(name_or_path)
    return name_or_path


@contextlib.contextmanager
def remote_code_refused(name_or_path: str, key: str = TRUST_KEY) -> Iterator[None]:
    """Turn transformers' refusal to run a folder's own code (several lines about ``trust_remote_code=True``)
    into a ``ConfigError`` naming the config key that allows it."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(
            f"config key '{key}': {name_or_path} ships its own modelling code (auto_map in its config), which "
            f"preftune runs only with {key}: true; set that only for a model folder you trust"
        ) from exc


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, key: str = TRUST_KEY) -> PreTrainedTokenizerBase:
    with remote_code_refused(name_or_path, key):
        tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path} has no EOS token; completions must end with one")
    if tokenizer.pad_token_id is None:  # padding positions are masked out, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _without_dropout(config) -> None:
    """Zero every dropout probability in a model config: with dropout the policy's log-probs are noisy and
    no longer comparable with the reference's, which biases the implicit reward."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)


def load_causal_lm(name_or_path: str, model_cfg: ModelConfig, keep_dropout: bool = False,
                   key: str = TRUST_KEY) -> nn.Module:
    path = resolve(name_or_path)
    with remote_code_refused(name_or_path, key):
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        if not keep_dropout:
            _without_dropout(config)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=DTYPES[model_cfg.dtype], attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    if not keep_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return model


def add_lora(model: nn.Module, lora: LoraConfig, task_type: str = "CAUSAL_LM") -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        task_type=task_type, bias="none",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora.target_modules {lora.target_modules} do not match the model; linear layers: {names}") from exc


def load_policy(config: Config) -> nn.Module:
    model = load_causal_lm(config.model.name_or_path, config.model, keep_dropout=config.model.dropout)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora.enabled:
        if config.model.gradient_checkpointing:
            model.enable_input_require_grads()
        model = add_lora(model, config.lora)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def load_frozen(name_or_path: str, model_cfg: ModelConfig, key: str = TRUST_KEY) -> nn.Module:
    model = load_causal_lm(name_or_path, model_cfg, key=key)
    model.requires_grad_(False)
    model.eval()
    return model


def launched_on_cpu() -> bool:
    """Several processes started by torchrun (or accelerate) on a machine without a GPU: accelerate then
    needs ``cpu=True`` to join them in one gloo process group (without it, each would train alone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(precision: str):
    """A fresh Accelerator for this run. accelerate keeps process-wide state that refuses a second run with
    another precision (a notebook training fp32 then bf16): reset that part, never the distributed one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", step_scheduler_with_optimizer=False,
                       cpu=launched_on_cpu())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
