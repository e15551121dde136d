"""On-policy and self-play preference optimization: procedures that sample from the policy being trained (or
from the optimal policy a reward model defines), judge the samples and train on them.

- ``rounds``: ``preftune iterate`` — rounds of sample -> judge -> train (iterative DPO, DNO, SPPO).
- ``online``: ``preftune online`` — sampling inside every training step (online DPO, SPO).
- ``rso``: ``preftune rso`` — statistical rejection sampling from π* ∝ π_sft·exp(r/β), tournament pairs.
- ``preferences`` / ``selection``: win matrices and win rates from a judge; which samples become training rows.
- ``stages``: resumable, fingerprinted stages shared by the drivers.

This package sits above ``training`` and ``feedback`` (it composes both); nothing below imports it.
"""
