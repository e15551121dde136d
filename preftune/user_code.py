"""Functions a config names by import path (a judge's ``function``, ``data.row_mapper``): ``package.module:name``
(importable, or a module in the current directory) or ``path/to/file.py:name``. Configs are trusted code: what
they name is imported and run."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError


def _import_module(module_name: str, key: str):
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ConfigError(f"config key '{key}': no such file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # the console script does not put the working directory on sys.path; a user's my_judges.py lives there
        if exc.name != module_name.split(".")[0] or "" in sys.path or "." in sys.path:
            raise ConfigError(f"config key '{key}': cannot import {module_name!r}: {exc}") from exc
    sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"config key '{key}': cannot import {module_name!r}: {exc}") from exc


def load_function(spec: str, key: str) -> Callable:
    """``"module:name"`` -> the callable it names; errors name the config ``key``."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"config key '{key}': expected 'module:function' or 'file.py:function', got {spec!r}")
    function = getattr(_import_module(module_name, key), name, None)
    if not callable(function):
        raise ConfigError(f"config key '{key}': {module_name!r} has no function {name!r}")
    return function
