"""Nested training state (an optimizer's, a scheduler's, the RNGs') as JSON plus safetensors.

Why not ``torch.save``/``torch.load``: they pickle, and unpickling a file runs whatever code the file
names, so a checkpoint folder from elsewhere could run code on resume. Why not ``torch.load(weights_only=True)``:
it is still an unpickler, made safe by an allow-list of globals; that list has been bypassed before
(CVE-2025-32434), and the numpy RNG state would need numpy's reconstruction globals added to it. JSON and
safetensors are parsers of plain data: the worst a crafted file can do is fail to parse.

Encoding (``NAME.json``): JSON scalars (None, bool, int, float, str) and lists stand for themselves; every
other value is an object with exactly one tag::

    {"tuple": [...]}              Adam's betas, Python's random state
    {"dict": [[key, value], ...]} keys may be ints (an optimizer's state is keyed by parameter index)
    {"tensor": "3"}               tensor "3" of NAME.safetensors (exact bits, any dtype, 0-d included)
    {"ndarray": "4"}              the same, read back as a numpy array (numpy's Mersenne Twister state)

Floats round-trip exactly: ``json`` writes ``repr`` (shortest exact form) and reads ``Infinity``/``NaN``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

SCALARS = (type(None), bool, int, float, str)


class StateFileError(ValueError):
    """A state file that is missing, unreadable or not in this format."""


def _encode(value: Any, tensors: dict[str, torch.Tensor], name: str) -> Any:
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, np.generic):  # a numpy scalar: its Python value
        return value.item()
    if isinstance(value, (torch.Tensor, np.ndarray)):
        key = str(len(tensors))
        if isinstance(value, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
            return {"ndarray": key}
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, list):
        return [_encode(v, tensors, name) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors, name) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors, name), _encode(v, tensors, name)] for k, v in value.items()]}
    raise TypeError(f"cannot write a {type(value).__name__} into the {name} state file (only plain data and tensors)")


def save_state(value: Any, folder: Path, name: str) -> list[Path]:
    """Write ``folder/NAME.json`` (and ``NAME.safetensors`` when ``value`` holds tensors); returns the files."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(value, tensors, name)
    files = [Path(folder) / f"{name}.json"]
    files[0].write_text(json.dumps(encoded), encoding="utf-8")
    if tensors:
        files.append(Path(folder) / f"{name}.safetensors")
        save_file(tensors, str(files[1]))
    return files


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "tuple" and isinstance(body, list):
            return tuple(_decode(v, tensors, where) for v in body)
        if tag == "dict" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
            keys = [_decode(k, tensors, where) for k, _ in body]
            if all(isinstance(k, SCALARS) for k in keys):
                return {k: _decode(v, tensors, where) for k, (_, v) in zip(keys, body, strict=True)}
        if tag in ("tensor", "ndarray") and isinstance(body, str) and body in tensors:
            return tensors[body] if tag == "tensor" else tensors[body].numpy()
    raise StateFileError(f"{where}: unexpected entry {json.dumps(value)[:80]}")


def load_state(folder: Path, name: str) -> Any:
    """Read back what ``save_state(value, folder, name)`` wrote; ``StateFileError`` names the bad file."""
    folder = Path(folder)
    where = str(folder / f"{name}.json")
    try:
        encoded = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StateFileError(f"{where} is missing") from exc
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise StateFileError(f"{where} is not a JSON state file ({type(exc).__name__})") from exc
    tensor_file = folder / f"{name}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    if tensor_file.is_file():
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise StateFileError(f"{tensor_file} is not a safetensors file ({type(exc).__name__})") from exc
    try:
        return _decode(encoded, tensors, where)
    except RecursionError as exc:
        raise StateFileError(f"{where}: nested too deeply") from exc
