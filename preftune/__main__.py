"""``python -m preftune``: what launchers run on every process, e.g.
``accelerate launch --num_processes 2 -m preftune train CONFIG`` or ``torchrun --nproc_per_node 2 -m preftune train CONFIG``."""

import sys

from .cli import run

sys.exit(run())
