"""sDPO (Kim et al. 2024, "sDPO: Don't Use Your Data All at Once", §2.2): the preference data is used in
stages; the model aligned in stage t becomes both the starting policy and the reference of stage t + 1.

Each stage is an ordinary run in ``<output_dir>/stage-<t>/`` on its own slice of the data (written to
``<output_dir>/stages/``), so it checkpoints and resumes like any run; a finished stage (its ``final/``
exists) is skipped, which makes the whole procedure resumable across stages.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

from accelerate import PartialState

from ..atomic import write_jsonl
from ..config import Config, save_config
from ..data import read_splits
from .distributed import is_main_process
from .loop import TrainResult, run_log
from .metrics import read_metrics
from .preference import train_run

log = logging.getLogger("preftune")


def _rows(examples) -> list[dict]:
    """Validated examples back to rows with canonical column names (the example fields)."""
    return [{k: v for k, v in dataclasses.asdict(ex).items() if k != "source"} for ex in examples]


def stage_files(config: Config, splits, folder: Path, write: bool = True) -> tuple[list[Path], Path | None]:
    """``training.stages: N`` cuts the validated train split into N consecutive parts in file order (sort
    the file easy-to-hard for the paper's curriculum); a list of files gives one stage per file. ``write``:
    False on all but the main process, which writes the parts (the others only need their names)."""
    stages = config.training.stages
    if isinstance(stages, list):  # each stage run reads its file with the recipe's own data settings
        return [Path(p) for p in stages], None
    eval_file = None
    if splits.eval:
        eval_file = folder / "eval.jsonl"
        if write:
            write_jsonl(eval_file, _rows(splits.eval))
    if stages > len(splits.train):
        raise ValueError(f"training.stages={stages} but only {len(splits.train)} training examples")
    bounds = [round(i * len(splits.train) / stages) for i in range(stages + 1)]
    files = []
    for t in range(stages):
        path = folder / f"stage-{t + 1}.jsonl"
        if write:
            write_jsonl(path, _rows(splits.train[bounds[t] : bounds[t + 1]]))
        files.append(path)
    return files, eval_file


def stage_config(config: Config, t: int, count: int, data_file: Path, eval_file: Path | None, start: str) -> Config:
    stage = copy.deepcopy(config)
    stage.training.stages = None
    stage.training.output_dir = str(Path(config.training.output_dir) / f"stage-{t}")
    stage.model.name_or_path = start
    stage.reference.name_or_path = None  # a frozen copy of this stage's starting model
    stage.data.train_file = str(data_file)
    if isinstance(config.training.stages, int):  # rows were written with canonical names, held-out apart
        stage.data.columns, stage.data.eval_fraction, stage.data.row_mapper = {}, 0.0, None
        stage.data.split = stage.data.eval_split = stage.data.subset = stage.data.data_dir = None
        stage.data.eval_file = str(eval_file) if eval_file else None
    if t < count and stage.lora.enabled:
        stage.lora.save = "merged"  # the next stage starts from (and refers to) the full aligned model
    return stage


def _finished(run_dir: Path) -> TrainResult:
    """The result of a stage finished by an earlier invocation, read back from its run directory."""
    history = read_metrics(run_dir)
    evals = [row for row in history if any(k.startswith("eval/") for k in row)]
    steps = max((row["step"] for row in history), default=0)
    return TrainResult(run_dir, run_dir / "final", steps, None, evals[-1] if evals else None, history)


def read_stage_data(config: Config, objective):
    """Every stage's rows validated before any model loads: the train file's splits for ``stages: N``; each
    file (split by the recipe's own eval settings) for a list of files."""
    root = Path(config.training.output_dir) if is_main_process() else None  # where skipped rows are reported
    if isinstance(config.training.stages, list):
        for path in config.training.stages:
            read_splits(dataclasses.replace(config, data=dataclasses.replace(config.data, train_file=path)),
                        objective, root)
        return None
    return read_splits(config, objective, root)


def train_in_stages(config: Config, objective, command: str = "train") -> TrainResult:
    """Run every stage in order, each a run of its own; returns the last stage's result."""
    root = Path(config.training.output_dir)
    with run_log(root):
        splits = read_stage_data(config, objective)
        main = is_main_process()  # with several processes the main one writes, the others wait for it
        files, eval_file = stage_files(config, splits, root / "stages", write=main)
        if main:
            save_config(config, root / "config.yaml")
        PartialState().wait_for_everyone()
        start, result = config.model.name_or_path, None
        for t, data_file in enumerate(files, start=1):
            stage = stage_config(config, t, len(files), data_file, eval_file, start)
            final = Path(stage.training.output_dir) / "final"
            if final.is_dir() and (final / "preftune_config.yaml").is_file():
                log.info("sDPO stage %d/%d already finished (%s): skipping", t, len(files), final)
                start, result = str(final), _finished(final.parent)
                continue
            log.info("sDPO stage %d/%d: policy and reference start from %s; data %s", t, len(files), start,
                     data_file)
            result = train_run(stage, objective, command)
            if result.interrupted:
                return result
            start = str(result.final_dir)
        return result
