"""Training: the loop, one step, log-probs, the reference (and its sync), schedule, checkpoints, metrics, export;
procedures above the loop (sDPO stages)."""

from .loop import NonFiniteLossError, TrainResult
from .run import train

__all__ = ["NonFiniteLossError", "TrainResult", "train"]
