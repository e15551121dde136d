"""Data held by the ``datasets`` library: a dataset on the Hugging Face hub by name, a folder written by
``save_to_disk``, or a folder of data files (a downloaded hub repository).

Hub names are read offline-first: ``datasets`` answers from its local cache (``HF_DATASETS_CACHE``, by
default ``~/.cache/huggingface/datasets``), and with ``HF_HUB_OFFLINE=1`` never touches the network. A
dataset that is not cached is a one-line error saying how to fetch it. Any split name works
(``data.split: train_prefs``); ``data.subset`` is the dataset's configuration, ``data.data_dir`` its folder.
Rows keep their source: ``HuggingFaceH4/ultrafeedback_binarized[train_prefs]:row 17``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .fields import DataValidationError

# "owner/name" or "name" as the hub spells repositories; a path with a data file's extension is a file
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".arrow")


@dataclass(frozen=True)
class DatasetRequest:
    """Which split of which dataset; ``key`` is the config key that named it (for errors)."""

    location: str
    key: str  # "data.train_file" or "data.eval_file"
    role: str  # "train" or "eval": picks the split when none is given
    split: str | None = None
    subset: str | None = None
    data_dir: str | None = None


def is_hub_name(value: str) -> bool:
    return bool(_HUB_NAME.fullmatch(value)) and not value.lower().endswith(_FILE_SUFFIXES)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _pick_split(label: str, splits: list[str], request: DatasetRequest) -> str:
    wanted = ("train",) if request.role == "train" else ("test", "validation", "eval")
    for split in wanted:
        if split in splits:
            return split
    option = "data.split" if request.role == "train" else "data.eval_split"
    raise DataValidationError(
        f"{label}: a DatasetDict without a {' / '.join(repr(s) for s in wanted)} split; its splits are "
        f"{', '.join(repr(s) for s in splits)}; set {option} to one of them"
    )


def _select(dataset, label: str, request: DatasetRequest, separator: str):
    """The requested (or default) split of a DatasetDict, and the label its rows are named by."""
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        if request.split:
            raise DataValidationError(f"{label}: holds a single dataset, not splits; remove data.split / "
                                      "data.eval_split for it")
        return dataset, label
    split = request.split or _pick_split(label, list(dataset), request)
    if split not in dataset:
        raise DataValidationError(f"{label}: no split {split!r}; its splits are "
                                  + ", ".join(repr(s) for s in dataset))
    return dataset[split], f"{label}/{split}" if separator == "/" else f"{label}[{split}]"


def _loaded(load, label: str, request: DatasetRequest):
    """``datasets.load_dataset`` picks a given split itself (slices such as ``train[:1000]`` included); without
    one the DatasetDict's train (or test) split is used."""
    if request.split:
        return load(split=request.split), f"{label}[{request.split}]"
    return _select(load(), label, request, "[")


def _saved(path: Path, request: DatasetRequest):
    import datasets

    if request.subset or request.data_dir:
        raise DataValidationError(f"{path}: a folder written by save_to_disk has no subsets or data_dir; remove "
                                  "data.subset / data.data_dir")
    return _select(datasets.load_from_disk(str(path)), path.name, request, "/")


def _files_folder(path: Path, request: DatasetRequest):
    """A folder of data files (e.g. ``hf download --repo-type dataset NAME --local-dir DIR``), read by datasets'
    own rules for finding splits."""
    import datasets

    try:
        return _loaded(lambda **split: datasets.load_dataset(str(path), request.subset, data_dir=request.data_dir,
                                                              **split), path.name, request)
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, DataValidationError):
            raise
        raise DataValidationError(
            f"{path}: a folder, but not one written by save_to_disk nor a folder of data files that datasets "
            f"can load ({_one_line(exc)})") from exc


def _fetch_hint(request: DatasetRequest) -> str:
    args = ", ".join(repr(a) for a in (request.location, request.subset) if a is not None)
    if request.data_dir:
        args += f", data_dir={request.data_dir!r}"
    return f'python -c "import datasets; datasets.load_dataset({args})"'


def _hub(request: DatasetRequest):
    import datasets

    name = request.location
    try:
        return _loaded(lambda **split: datasets.load_dataset(name, request.subset, data_dir=request.data_dir,
                                                              **split), name, request)
    except ConnectionError as exc:
        offline = " (HF_HUB_OFFLINE=1)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DataValidationError(
            f"{request.key}: {name!r} is not a local file or folder, and the datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}) does not hold it{offline}; download it once with network "
            f"access: {_fetch_hint(request)}") from exc
    except (FileNotFoundError, ValueError) as exc:  # no such dataset, subset or split
        if isinstance(exc, DataValidationError):
            raise
        asked = ", ".join(f"{key} {value!r}" for key, value in (("split", request.split), ("subset", request.subset),
                                                               ("data_dir", request.data_dir)) if value)
        raise DataValidationError(f"{request.key}: {name!r}{' (' + asked + ')' if asked else ''}: "
                                  f"{_one_line(exc)}") from exc


def open_dataset(request: DatasetRequest):
    """(``datasets.Dataset``, label of its rows) for a hub name or a dataset folder. The dataset stays a
    memory-mapped Arrow table: rows are read from disk when asked for."""
    path = Path(request.location).expanduser()
    if path.is_dir():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        return _saved(path, request) if saved else _files_folder(path, request)
    return _hub(request)
