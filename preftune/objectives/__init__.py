"""Objectives: pure functions of log-prob tensors, one file each, listed in the explicit table (``table.py``);
``plan.py`` combines one with its modifiers and mixture parts; ``compute.py`` runs them; ``loss.py`` is the
entry point on plain tensors."""

from .base import GroupLogps, Objective, ObjectiveOutput, PairedLogps
from .compute import compute, takes_groups
from .loss import preference_loss
from .table import OBJECTIVES, SHARED_PARAMS, get_objective, make_params, param_names

__all__ = ["OBJECTIVES", "SHARED_PARAMS", "GroupLogps", "Objective", "ObjectiveOutput", "PairedLogps", "compute",
           "get_objective", "make_params", "param_names", "preference_loss", "takes_groups"]
