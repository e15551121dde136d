"""``preftune eval``: held-out pair metrics of a trained or base model (no training)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .. import modeling
from ..config import Config
from ..data import Collator, batches, read_splits, tokenize_splits
from ..training.logps import CompletionLogps
from ..training.precision import bf16_compute
from ..training.reference import AdapterOffReference, build_reference
from ..training.schedule import sequential_batches
from ..training.step import Scorer, evaluate
from .analysis.likelihood_length import LikelihoodRecorder, likelihood_length_metrics

log = logging.getLogger("preftune")


def _load_policy(config: Config):
    """A full model folder, or a PEFT adapter folder (its base is then the reference, adapters off)."""
    path = Path(modeling.resolve(config.model.name_or_path))
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        with modeling.remote_code_refused(str(path)):  # the adapter's base model is loaded here
            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=modeling.DTYPES[config.model.dtype],
                                                             trust_remote_code=config.model.trust_remote_code)
        return model, True
    return modeling.load_causal_lm(str(path), config.model), False


def evaluate_model(config: Config) -> dict[str, float]:
    """Metrics over the held-out split (or the whole train file when there is none), written to
    ``<output_dir>/eval.json``."""
    objective = config.objective.plan()
    splits = read_splits(config, objective, None)
    examples = splits.eval or splits.train
    if not splits.eval:
        log.warning("no held-out split configured: evaluating on every row of %s", config.data.train_file)
    accelerator = modeling.make_accelerator(config.training.precision)
    tokenizer = modeling.load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    splits.train, splits.eval = examples, []
    tokenized = tokenize_splits(config, splits, tokenizer).train
    policy, is_adapter = _load_policy(config)
    policy = policy.to(accelerator.device).eval()
    chunk = config.training.logps_chunk_size
    if objective.needs_reference and is_adapter and not config.reference.name_or_path:
        reference = AdapterOffReference(policy, chunk, accelerator.autocast, config.training.packing)
    else:
        config.lora.enabled = False
        reference = build_reference(config, objective, policy, accelerator.autocast)
    wrapped = CompletionLogps(policy, chunk, packing=config.training.packing)
    recorder = LikelihoodRecorder(lambda *a, **kw: _autocast_call(accelerator, wrapped, *a, **kw))
    scorer = Scorer(recorder, reference, objective)
    if objective.needs_live_reference and reference is not None:
        scorer.token_reference = reference.token_level()
    order = sequential_batches(len(tokenized), config.training.eval_batch_size)
    loader = batches(tokenized, order, Collator(tokenizer.pad_token_id, splits.shape), accelerator.device)
    with bf16_compute(config.training.precision, accelerator.device):
        metrics = evaluate(scorer, tqdm(loader, total=len(order), desc="evaluating"), policy)
    metrics["eval/examples"] = float(len(tokenized))
    metrics.update(likelihood_length_analysis(recorder, splits.shape))
    out = Path(config.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def likelihood_length_analysis(recorder: LikelihoodRecorder, shape: str) -> dict[str, float]:
    """The SimPO analysis (``analysis/likelihood_length.py``) of the pairs just evaluated: Spearman correlation
    of the policy's average log-likelihood with completion length. Pairs only: other shapes' batches hold rows
    (e.g. KTO's mismatched KL rows) that are not completions of the data."""
    return likelihood_length_metrics(recorder.batches) if shape == "pairs" else {}


def _autocast_call(accelerator: Accelerator, module: torch.nn.Module, *args, **kwargs):
    with accelerator.autocast():
        return module(*args, **kwargs)
