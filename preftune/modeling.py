"""Loading the policy, its tokenizer and a reference model from a Hugging Face folder (or hub name), and the
accelerator a run computes with.

A model path may also be a PEFT adapter folder (``adapter_config.json`` naming its base): its base is loaded
and the adapter put on top (trainable, to train an SFT adapter further; or merged, to sample from it). With
``model.quantization`` the base weights load through bitsandbytes (QLoRA: NF4 with double quantization,
Dettmers et al. 2023) on the process's own device.

A model folder is data: its config, weights and tokenizer are read, but Python modules it ships (``auto_map``
in its config) run only when the config says ``trust_remote_code: true``. transformers is always told
``trust_remote_code`` explicitly (left unset, it would ask on the terminal), and its refusal becomes one
line naming preftune's key.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .config import Config, ConfigError, LoraConfig, ModelConfig

log = logging.getLogger("preftune")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the dtype the matmuls of quantized layers compute in, per training.precision
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRUST_KEY = "model.trust_remote_code"  # where most commands keep it; callers with another section pass theirs


def resolve(name_or_path: str) -> str:
    """Built-in model names (``builtin:...``) resolve to a local folder; a local path is checked (it exists, and
    is a model rather than a preftune run folder); a hub name is left to transformers."""
    if name_or_path.startswith("builtin:"):
        from .assets import resolve_model_path

        return resolve_model_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "final").is_dir():
        raise ValueError(f"{name_or_path} is a preftune run folder, not a model: its trained model is "
                         f"{path / 'final'}")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.exists():
        raise ValueError(f"model {name_or_path}: no such folder (looked for {path.absolute()})")
    return name_or_path


def _hub_unreachable(name_or_path: str, exc: OSError) -> ValueError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    where = ("the Hugging Face hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else
             "the Hugging Face hub has no such model or cannot be reached")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ValueError(f"model {name_or_path}: not a local folder, and {where} ({first[:200]})")


@contextlib.contextmanager
def remote_code_refused(name_or_path: str, key: str = TRUST_KEY) -> Iterator[None]:
    """Turn transformers' refusal to run a folder's own code (several lines about ``trust_remote_code=True``)
    into a ``ConfigError`` naming the config key that allows it."""
    try:
        yield
    except OSError as exc:  # transformers' "not a local folder and not on the hub": dozens of lines otherwise
        if Path(name_or_path).expanduser().is_dir():
            raise
        raise _hub_unreachable(name_or_path, exc) from exc
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(
            f"config key '{key}': {name_or_path} ships its own modelling code (auto_map in its config), which "
            f"preftune runs only with {key}: true; set that only for a model folder you trust"
        ) from exc


def adapter_base(path: Path) -> str | None:
    """The base model a PEFT adapter folder names, or None when ``path`` is not an adapter folder. A relative
    base path that does not exist from the current directory is read relative to the adapter folder."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        return None
    base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file} names no base_model_name_or_path; cannot tell which model it adapts")
    beside_adapter = Path(path) / base
    if not Path(base).is_absolute() and not Path(base).exists() and beside_adapter.exists():
        return str(beside_adapter.resolve())
    return base


def is_adapter(name_or_path: str) -> bool:
    return adapter_base(Path(resolve(name_or_path))) is not None


def portable_path(name_or_path: str) -> str:
    """An existing local folder as an absolute path (it then loads from any directory); hub names unchanged."""
    resolved = resolve(name_or_path)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, key: str = TRUST_KEY) -> PreTrainedTokenizerBase:
    """A model folder's tokenizer; for an adapter folder its own (preftune's final/ saves one), else its base's."""
    path = resolve(name_or_path)
    base = adapter_base(Path(path))
    if base is not None and not (Path(path) / "tokenizer_config.json").is_file():
        path = resolve(base)
    with remote_code_refused(name_or_path, key):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
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


def quantization_config(quantization: str, precision: str):
    """bitsandbytes settings of QLoRA (Dettmers et al. 2023, Section 3): 4-bit NormalFloat weights with
    double quantization (the block scales quantized too), matmuls in ``precision``'s dtype; or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=COMPUTE_DTYPES[precision])
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def place(model: nn.Module, device) -> nn.Module:
    """``model.to(device)``; quantized weights were placed on the process's device when they loaded."""
    return model if is_quantized(model) else model.to(device)


def process_device() -> torch.device:
    """This process's device (its own GPU under ``accelerate launch``/``torchrun``, else cuda:0 or CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=launched_on_cpu()).device


def load_causal_lm(name_or_path: str, model_cfg: ModelConfig, keep_dropout: bool = False,
                   key: str = TRUST_KEY, precision: str = "fp32") -> nn.Module:
    """A causal LM from a model folder; with ``model_cfg.quantization`` its linear layers are bitsandbytes
    layers computing in ``precision``'s dtype, on this process's device."""
    path = resolve(name_or_path)
    extra = {}
    if model_cfg.quantization:
        extra = {"quantization_config": quantization_config(model_cfg.quantization, precision),
                 "device_map": {"": process_device()}}
    with remote_code_refused(name_or_path, key):
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        if not keep_dropout:
            _without_dropout(config)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=DTYPES[model_cfg.dtype], attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code, **extra,
        )
    if not keep_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if model_cfg.quantization:
        keep_4bit_layers_trainable(model)
    return model


def keep_4bit_layers_trainable(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU inference repacking in every 4-bit layer of ``model``; returns how many.

    On a CPU with AVX-512-BF16, bitsandbytes repacks a 4-bit layer's weight, in place and for good, the first
    time the layer runs in eval mode on an input that needs no gradient (a reference forward, an evaluation, a
    sampling round). From then on that layer multiplies with an inference kernel that computes in bf16
    whatever its compute dtype, and passes no gradient back to its input, so LoRA adapters upstream of it stop
    training without a word (a QLoRA DPO run's adapters never moved). With the repacking off, every call
    dequantizes and multiplies in the compute dtype, as on every other CPU."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


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
    """The model to train: the base (quantized for QLoRA), plus new LoRA adapters or, when
    ``model.name_or_path`` is an adapter folder, that adapter made trainable."""
    start = config.model.name_or_path
    base = adapter_base(Path(resolve(start)))
    if base is not None and not config.lora.enabled:
        raise ConfigError(f"config key 'lora.enabled': model.name_or_path {start} is a LoRA adapter; set "
                          "lora.enabled: true to train it further, or merge it into its base and start from that")
    gradient_checkpointing = config.model.gradient_checkpointing
    model = load_causal_lm(base or start, config.model, keep_dropout=config.model.dropout,
                           precision=config.training.precision)
    if config.model.quantization:
        from peft import prepare_model_for_kbit_training

        # freezes the quantized base, keeps norms and embeddings in fp32, and wires gradient checkpointing
        # so that gradients reach the adapters through the frozen layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora.enabled:
            model.enable_input_require_grads()
    if gradient_checkpointing:
        model.config.use_cache = False
    if base is not None:
        return _trainable_adapter(model, start)
    return add_lora(model, config.lora) if config.lora.enabled else model


def _trainable_adapter(model: nn.Module, folder: str) -> nn.Module:
    from peft import PeftModel

    path = resolve(folder)
    adapter = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    if adapter.get("peft_type") != "LORA":
        raise ConfigError(f"config key 'model.name_or_path': {folder} is a {adapter.get('peft_type')} adapter; "
                          "only LoRA adapters can be trained further")
    log.info("training the LoRA adapter %s further: its own r=%s, alpha=%s, target_modules=%s are used "
             "(lora.r, lora.alpha, lora.target_modules are not)", folder, adapter.get("r"),
             adapter.get("lora_alpha"), adapter.get("target_modules"))
    return PeftModel.from_pretrained(model, path, is_trainable=True)


def load_merged(name_or_path: str, model_cfg: ModelConfig, key: str = TRUST_KEY, precision: str = "fp32") -> nn.Module:
    """A full model folder, or an adapter folder on its base, in eval mode. The adapter is merged into the
    base (every token then costs what the plain model costs), except into quantized weights, where merging
    would round it: there it stays a separate (exact) layer."""
    path = resolve(name_or_path)
    base = adapter_base(Path(path))
    if base is None:
        return load_causal_lm(path, model_cfg, key=key, precision=precision).eval()
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base, model_cfg, key=key, precision=precision), path)
    return (model if model_cfg.quantization else model.merge_and_unload()).eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def load_frozen(name_or_path: str, model_cfg: ModelConfig, key: str = TRUST_KEY, precision: str = "fp32") -> nn.Module:
    """A model (or an adapter on its base, merged) that is never trained: a reference, a judge."""
    model = load_merged(name_or_path, model_cfg, key=key, precision=precision)
    model.requires_grad_(False)
    model.eval()
    return model


def launched_on_cpu() -> bool:
    """Several processes started by torchrun (or accelerate) on a machine without a GPU: accelerate then
    needs ``cpu=True`` to join them in one gloo process group (without it, each would train alone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(precision: str, log_with: list[str] = (), run_dir=None, key: str = "training.precision"):
    """A fresh Accelerator for this run. accelerate keeps process-wide state that refuses a second run with
    another precision (a notebook training fp32 then bf16): reset that part, never the distributed one.
    ``log_with``: the experiment trackers (``training.metrics.tracker_names``); TensorBoard writes under
    ``run_dir/tensorboard/``.

    fp16 is autocast plus a gradient scaler, which accelerate sets up on GPUs only: on a CPU it would train
    in fp32 without saying so, so it is refused there."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    AcceleratorState._reset_state(reset_partial_state=False)
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    if mixed == "fp16" and process_device().type == "cpu":
        raise ConfigError(f"config key '{key}': fp16 needs a GPU (accelerate runs fp16 autocast with a gradient "
                          "scaler only there; on a CPU the run would silently stay fp32); use bf16 or fp32")
    project = None
    if run_dir is not None:
        project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tensorboard"))
    accelerator = Accelerator(mixed_precision=mixed, step_scheduler_with_optimizer=False, cpu=launched_on_cpu(),
                              log_with=list(log_with) or None, project_config=project)
    from .training.engines import complete_launch

    complete_launch(accelerator, mixed)
    return accelerator


def count_parameters(model: nn.Module) -> tuple[int, int]:
    def size(p):  # a DeepSpeed ZeRO-3 parameter holds no data of its own outside a forward
        return getattr(p, "ds_numel", p.numel())

    total = sum(size(p) for p in model.parameters())
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return trainable, total
