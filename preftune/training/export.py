"""``final/``: a folder ``AutoModelForCausalLM.from_pretrained`` loads (or a PEFT adapter naming its base),
with the tokenizer, the resolved config and a model card recording data, objective, settings and metrics.

Local paths recorded there (an adapter's base, the starting model and reference in ``preftune_config.yaml``)
are absolute, so that ``final/`` loads and ``preftune eval`` finds its reference from any directory."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from ..config import Config, to_dict
from ..modeling import adapter_base, portable_path, resolve


def _latest(history: list[dict], prefix: str) -> dict[str, float]:
    """The most recent logged value of every metric whose name starts (or not) with ``eval/``."""
    found: dict[str, float] = {}
    for row in history:
        for key, value in row.items():
            if key != "step" and key.startswith("eval/") == (prefix == "eval/"):
                found[key] = value
    return found


def _remote_code_note(config: Config) -> list[str]:
    """Whoever loads this model may need the same trust: say that the run ran the folder's own code."""
    if not config.model.trust_remote_code:
        return []
    return [f"Loaded with `model.trust_remote_code: true`: Python modules shipped in `{config.model.name_or_path}` "
            "(its config's `auto_map`) were run.", ""]


def model_card(config: Config, history: list[dict], data, objective) -> str:
    params = {**{f.name: f.default for f in dataclasses.fields(objective.params)}, **config.objective.params}
    extras = {k: v for k, v in to_dict(config)["objective"].items() if k in ("ld_alpha", "wpo", "mixture") and v}
    train_metrics, eval_metrics = _latest(history, ""), _latest(history, "eval/")
    lines = [
        "---", "library_name: preftune", f"base_model: {config.model.name_or_path}",
        f"tags: [preftune, {objective.name}{', lora' if config.lora.enabled else ''}]", "---", "",
        f"# {Path(config.training.output_dir).name}", "",
        f"Trained with [preftune](https://pypi.org/project/preftune/) objective `{objective.name}` "
        f"({objective.paper}) starting from `{config.model.name_or_path}`.", "",
        *_remote_code_note(config),
        "## Data", "",
        f"- train: `{config.data.train_file}` ({len(data.train)} examples after validation and truncation)",
        f"- held-out: {len(data.eval)} examples"
        + (f" from `{config.data.eval_file}`" if config.data.eval_file else
           f" ({config.data.eval_fraction:.0%} of the train file)" if config.data.eval_fraction else ""),
        *[f"- {summary}" for summary in data.summaries], "",
        "## Objective", "", "```yaml",
        yaml.safe_dump({"name": objective.name, **params, "rpo_alpha": config.objective.rpo_alpha, **extras}).strip(),
        "```", "", "## Training settings", "", "```yaml",
        yaml.safe_dump({k: v for k, v in to_dict(config).items() if k in ("training", "lora", "reference")},
                       sort_keys=False).strip(), "```", "", "## Final metrics", "", "| metric | value |", "| --- | --- |",
    ]
    lines += [f"| {k} | {v:.6g} |" for k, v in {**train_metrics, **eval_metrics}.items() if isinstance(v, float)]
    return "\n".join(lines) + "\n"


def export_final(config: Config, model: nn.Module, tokenizer, run_dir: Path, history, data, objective,
                 value_head: nn.Module | None = None, whole: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``final/`` under a temporary name and rename it into place (an interrupted export leaves the
    previous ``final/`` intact). ``whole``: under FSDP2, the state dict of ``model`` (``model.*``) and of
    ``value_head`` (``value_head.*``) gathered into whole tensors; ``model``'s own parameters are shards."""
    final, tmp = run_dir / "final", run_dir / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    weights = _part(whole, "model.")
    if hasattr(model, "peft_config"):
        if config.lora.save == "merged" and weights is not None:
            _merge_gathered_adapter(config, model, weights, tmp)
        elif config.lora.save == "merged":
            model.merge_and_unload().save_pretrained(tmp)  # merging is the last use of this model
        else:
            model.save_pretrained(tmp, state_dict=weights)
            _point_adapter_at_base(tmp, config)
    else:
        model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    if value_head is not None:  # DRO's V(x), on the policy's last prompt hidden state
        head = _part(whole, "value_head.") or value_head.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(tmp / "value_head.safetensors"))
    (tmp / "preftune_config.yaml").write_text(yaml.safe_dump(_record(config), sort_keys=False), encoding="utf-8")
    (tmp / "README.md").write_text(model_card(config, history, data, objective), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _part(whole: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    if whole is None:
        return None
    return {name[len(prefix):]: tensor for name, tensor in whole.items() if name.startswith(prefix)}


def _merge_gathered_adapter(config: Config, model: nn.Module, weights: dict[str, torch.Tensor], tmp: Path) -> None:
    """``lora.save: merged`` under FSDP2: the sharded model cannot merge in place, so the gathered adapter is
    written, loaded onto a fresh copy of its base, merged and saved (the main process holds one whole model)."""
    from ..modeling import load_merged

    adapter = tmp.with_name(tmp.name + "-adapter")
    shutil.rmtree(adapter, ignore_errors=True)
    model.save_pretrained(adapter, state_dict=weights)
    _point_adapter_at_base(adapter, config)
    try:
        load_merged(str(adapter), config.model).save_pretrained(tmp)
    finally:
        shutil.rmtree(adapter, ignore_errors=True)


def _record(config: Config) -> dict:
    """The run's config with its starting model and reference as paths that work from any directory."""
    record = to_dict(config)
    record["model"]["name_or_path"] = portable_path(config.model.name_or_path)
    if config.reference.name_or_path:
        record["reference"]["name_or_path"] = portable_path(config.reference.name_or_path)
    return record


def _point_adapter_at_base(folder: Path, config: Config) -> None:
    """PEFT records the base model's path; make it the resolved local folder, absolute, so the adapter loads
    offline and from any directory. A run that started from an adapter adapts that adapter's base (never
    the quantized weights: quantization is a loading choice, not part of the base)."""
    path = folder / "adapter_config.json"
    adapter = json.loads(path.read_text(encoding="utf-8"))
    start = resolve(config.model.name_or_path)
    adapter["base_model_name_or_path"] = portable_path(adapter_base(Path(start)) or start)
    path.write_text(json.dumps(adapter, indent=2), encoding="utf-8")
