"""``preftune train`` / ``preftune sft``: one run, or the procedure the config asks for (sDPO stages),
with the objective plan built once from the checked config and handed to every part that needs it."""

from __future__ import annotations

from ..config import Config
from .loop import TrainResult
from .preference import train_run
from .stages import train_in_stages


def train(config: Config, command: str = "train") -> TrainResult:
    """Run the training job ``config`` describes; returns the (last) run's summary."""
    objective = config.objective.plan()
    if config.training.stages:
        return train_in_stages(config, objective, command)
    return train_run(config, objective, command)
