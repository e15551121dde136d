"""preftune: align causal language models with preference data (DPO and its family), no RL."""

from .config import Config, load_config
from .objectives import OBJECTIVES, preference_loss

__version__ = "0.1.0"


def train(config: Config, command: str = "train"):
    """Run one training job described by ``config``; returns the run's summary (see ``trainer.TrainResult``)."""
    from .training import train as _train

    return _train(config, command=command)


__all__ = ["OBJECTIVES", "Config", "load_config", "preference_loss", "train", "__version__"]
