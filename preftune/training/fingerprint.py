"""What determines a run, so that resuming never mixes two experiments: the settings that change what is
trained (the config without the keys that only shape the output), the data as tokenized, and the starting
model. A checkpoint records it; resuming from one recorded with something else is refused, naming each
difference and the two ways out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Keys that change how a run reports or saves itself, never what it trains: a resumed run may change them.
OUTPUT_ONLY = ("output_dir", "resume", "progress_bar", "logging_steps", "eval_steps", "eval_before_training",
               "eval_batch_size", "save_steps", "save_total_limit", "tensorboard", "report_to", "cache_dir",
               "sample_prompts", "sample_max_new_tokens")


# Keys a resumed run may change to train for more or fewer steps: a warning says the schedule follows the new
# length, since a linear or cosine learning rate then differs from the one the first run was heading for.
LENGTH = ("training.max_steps", "training.epochs")


class RunMismatchError(ValueError):
    """A checkpoint was written by a run with other settings, data or model than the one asked for now."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat or {prefix.rstrip("."): {}}


def settings(config_tree: dict) -> dict[str, Any]:
    """The config as dotted keys, without the output-only ones, JSON-normalised (tuples become lists)."""
    flat = {k.rstrip("."): v for k, v in flatten(config_tree).items()}
    kept = {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in OUTPUT_ONLY}
    return json.loads(json.dumps(kept, default=str))


def model_identity(name_or_path: str) -> str:
    """A local model folder by its config and weight files (names and sizes: cheap, and a retrained or replaced
    model changes them); anything else (a hub or builtin name) by its name."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name in ("config.json", "adapter_config.json"):
            digest.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin"):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return f"{folder.resolve()}#{digest.hexdigest()[:16]}"


def check_same_run(recorded: dict | None, current: dict, checkpoint: Path) -> list[str]:
    """Refuse to resume from ``checkpoint`` when it was recorded with other settings, data or model; returns
    the changes of run length, which are allowed."""
    if recorded is None:  # written before fingerprints existed: nothing to compare
        return []
    problems, lengths = [], []
    old, new = recorded.get("settings", {}), current["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            (lengths if key in LENGTH else problems).append(f"{key}: {old.get(key)!r} there, {new.get(key)!r} now")
    for part, what in (("data", "the training data (its content as tokenized)"), ("model", "the starting model")):
        if recorded.get(part) != current[part]:
            problems.append(f"{what} differs")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise RunMismatchError(
            f"{checkpoint} was written by a run with other settings, so this run cannot resume from it ({shown}). "
            "Give this run a new training.output_dir, or set training.resume: never to start over there "
            "(its checkpoints will be replaced)")
    return lengths
