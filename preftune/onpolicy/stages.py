"""Resumable stages for the on-policy drivers, as ``preftune frontier`` does them: each stage writes into its own
folder and a ``stage.json`` there records a fingerprint of every setting that produced it.

A rerun skips a finished stage, resumes an unfinished one (sampling and training resume by themselves), and
refuses a folder whose fingerprint differs: a changed recipe under the same output folder is an error naming
the settings that changed, never a silent mix of two experiments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_json

log = logging.getLogger("preftune")
MARKER = "stage.json"


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def run_stage(folder: Path, settings: dict, work: Callable[[], dict]) -> dict:
    """``work()``'s result (a JSON-able dict), computed once per fingerprint of ``settings``; see the module
    docstring. Interrupting ``work`` leaves the stage unfinished: the same call resumes it."""
    marker = folder / MARKER
    key = fingerprint(settings)
    if marker.is_file():
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        if recorded.get("fingerprint") != key:
            changed = ", ".join(_changed(recorded.get("settings") or {}, json.loads(json.dumps(settings, default=str))))
            raise ValueError(f"{folder} was produced with other settings (changed: {changed or 'unknown'}); delete "
                             "that folder (or the whole output_dir) to recompute it, or choose another output_dir")
        if recorded.get("finished"):
            log.info("stage %s already finished: skipping", folder)
            return recorded["result"]
        log.info("stage %s was interrupted: resuming", folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": key, "settings": json.loads(json.dumps(settings, default=str)),
                        "finished": False})
    start = time.perf_counter()
    result = work()
    result = {**result, "seconds": round(time.perf_counter() - start, 1)}
    write_json(marker, {"fingerprint": key, "settings": json.loads(json.dumps(settings, default=str)),
                        "finished": True, "result": result})
    return result
