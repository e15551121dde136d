"""``preftune eval``: held-out pair metrics of a trained or base model (no training).

The implicit reward compares the model with a reference, and a model compared with itself scores zero
everywhere, so the reference is never the evaluated model by accident. It is, in this order:
``reference.name_or_path`` when set; else the reference the model was trained against, as recorded in the
``preftune_config.yaml`` preftune writes into ``final/`` (its ``reference.name_or_path``, else its starting
model, which for an adapter trained from an SFT adapter is that SFT model); else, for a PEFT adapter
folder, its base (adapters off). A full model with none of these is an error naming the key to set.
When the reference is the adapter's own base, the adapters are switched off instead of loading it twice.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

from .. import modeling
from ..atomic import write_json
from ..config import Config, ConfigError
from ..data import Collator, batches, read_splits, tokenize_examples
from ..training.logps import CompletionLogps
from ..training.precision import compute_kernels
from ..training.reference import AdapterOffReference, ModelReference
from ..training.schedule import sequential_batches
from ..training.step import Scorer, evaluate
from .analysis.likelihood_length import LikelihoodRecorder, likelihood_length_metrics

log = logging.getLogger("preftune")
RECORD = "preftune_config.yaml"  # written into final/ by training/export.py


def _load_policy(config: Config) -> torch.nn.Module:
    """A full model folder, or a PEFT adapter folder on its base (not merged, so its adapters can be off)."""
    path = modeling.resolve(config.model.name_or_path)
    base = modeling.adapter_base(Path(path))
    precision = config.training.precision
    if base is None:
        return modeling.load_causal_lm(path, config.model, precision=precision)
    from peft import PeftModel

    return PeftModel.from_pretrained(modeling.load_causal_lm(base, config.model, precision=precision), path)


def recorded_reference(model_path: Path) -> str | None:
    """The reference a preftune run trained ``model_path`` against: from its ``preftune_config.yaml``, the
    run's ``reference.name_or_path``, else its starting model ``model.name_or_path``; None without a record."""
    record = model_path / RECORD
    if not record.is_file():
        return None
    raw = yaml.safe_load(record.read_text(encoding="utf-8")) or {}
    return (raw.get("reference") or {}).get("name_or_path") or (raw.get("model") or {}).get("name_or_path") or None


def reference_for(config: Config) -> str | None:
    """The name of the model the evaluated one is compared with (see the module docstring), or None for an
    adapter's own base; a full model with no reference to compare with is an error."""
    path = Path(modeling.resolve(config.model.name_or_path))
    if config.reference.name_or_path:
        return config.reference.name_or_path
    recorded = recorded_reference(path)
    if recorded and Path(recorded).is_absolute() and not Path(recorded).exists():
        raise ConfigError(f"config key 'reference.name_or_path': {path / RECORD} says the model was trained against "
                          f"{recorded}, which does not exist here; set reference.name_or_path to that model")
    if recorded is None and modeling.adapter_base(path) is None:
        raise ConfigError(f"config key 'reference.name_or_path': {config.model.name_or_path} is a full model with no "
                          f"{RECORD} saying what it was trained from, and comparing it with itself would make every "
                          "implicit reward zero; set reference.name_or_path to the model training started from")
    return recorded


def build_eval_reference(config: Config, policy: torch.nn.Module, autocast) -> ModelReference:
    name, chunk = reference_for(config), config.training.logps_chunk_size
    base = modeling.adapter_base(Path(modeling.resolve(config.model.name_or_path)))
    if base is not None and (name is None or modeling.portable_path(name) == modeling.portable_path(base)):
        log.info("reference: the adapter's base %s (adapters off)", base)
        return AdapterOffReference(policy, chunk, autocast, config.training.packing)
    log.info("reference: %s", name)
    model = modeling.load_frozen(name, config.model, precision=config.training.precision)
    return ModelReference(modeling.place(model, next(policy.parameters()).device), chunk, autocast,
                          config.training.packing)


def report_path(config: Config) -> Path:
    """``<output_dir>/eval-<model>.json``: named after the evaluated model, so evaluating another model (or
    the same run's checkpoints) into one folder keeps every report."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", config.model.name_or_path).strip("-.")[-100:] or "model"
    return Path(config.training.output_dir) / f"eval-{slug}.json"


def evaluate_model(config: Config) -> dict[str, float]:
    """Metrics over the held-out split (or the whole train file when there is none), written to
    ``report_path(config)``."""
    objective = config.objective.plan()
    if objective.needs_reference:
        reference_for(config)  # no usable reference fails before any data is read or model loaded
    splits = read_splits(config, objective, None)
    examples = splits.eval or splits.train
    if not splits.eval:
        log.warning("no held-out split configured: evaluating on every row of %s", config.data.train_file)
    accelerator = modeling.make_accelerator(config.training.precision)
    tokenizer = modeling.load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    tokenized, summary = tokenize_examples(examples, tokenizer, config.data)
    log.info("%s: %s", "held-out" if splits.eval else "all rows", summary.describe())
    policy = modeling.place(_load_policy(config), accelerator.device).eval()
    reference = build_eval_reference(config, policy, accelerator.autocast) if objective.needs_reference else None
    wrapped = CompletionLogps(policy, config.training.logps_chunk_size, packing=config.training.packing)
    recorder = LikelihoodRecorder(lambda *a, **kw: _autocast_call(accelerator, wrapped, *a, **kw))
    scorer = Scorer(recorder, reference, objective)
    if objective.needs_live_reference and reference is not None:
        scorer.token_reference = reference.token_level()
    order = sequential_batches(len(tokenized), config.training.eval_batch_size)
    loader = batches(tokenized, order, Collator(tokenizer.pad_token_id, splits.shape), accelerator.device)
    with compute_kernels(config.training.precision, accelerator.device):
        metrics = evaluate(scorer, tqdm(loader, total=len(order), desc="evaluating"), policy)
    metrics["eval/examples"] = float(len(tokenized))
    metrics.update(likelihood_length_analysis(recorder, splits.shape))
    write_json(report_path(config), metrics)
    return metrics


def likelihood_length_analysis(recorder: LikelihoodRecorder, shape: str) -> dict[str, float]:
    """The SimPO analysis (``analysis/likelihood_length.py``) of the pairs just evaluated: Spearman correlation
    of the policy's average log-likelihood with completion length. Pairs only: other shapes' batches hold rows
    (e.g. KTO's mismatched KL rows) that are not completions of the data."""
    return likelihood_length_metrics(recorder.batches) if shape == "pairs" else {}


def _autocast_call(accelerator: Accelerator, module: torch.nn.Module, *args, **kwargs):
    with accelerator.autocast():
        return module(*args, **kwargs)
