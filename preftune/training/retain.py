"""A retain set: an NLL term on other data, added to any objective's loss.

NPO (Zhang et al. 2024, "Negative Preference Optimization", §4, "NPO+RT") unlearns the forget set while
keeping the model's ability on a retain set: L = L_NPO(forget) + λ · E_retain[-log π(y|x) / |y|]. The
retain examples (prompt/completion or messages) are drawn on a schedule of their own, a pure function of
seed and step like the main one, so resumed runs see the same retain batches.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..config import Config
from ..data import Collator, batches, load_examples, tokenize_examples
from .metrics import MeanAccumulator
from .schedule import BatchSchedule

log = logging.getLogger("preftune")


class RetainSet:
    def __init__(self, config: Config, tokenizer, device: torch.device, rank: int, world: int):
        data = dataclasses.replace(config.data, train_file=config.data.retain_file, eval_file=None,
                                   eval_fraction=0.0, columns={}, ranked_to_pairs=None, row_mapper=None, split=None,
                                   eval_split=None, subset=None, data_dir=None, streaming=False)
        splits = load_examples(data, ("completions",), seed=config.training.seed)
        self.examples, summary = tokenize_examples(splits.train, tokenizer, data)
        log.info("retain set %s: %s", config.data.retain_file, summary.describe())
        t = config.training
        self.schedule = BatchSchedule(len(self.examples), t.batch_size * world, t.gradient_accumulation_steps,
                                      t.seed + 1, rank, world)
        self.collator = Collator(tokenizer.pad_token_id, "completions")
        self.weight, self.device, self.world = config.objective.retain_weight, device, world

    def loss(self, policy, step: int, micro: int, stats: MeanAccumulator) -> torch.Tensor:
        """λ · (mean token NLL), weighted so that the step's retain examples average as one batch."""
        positions = self.schedule.step(step)
        total = sum(len(p) for p in positions)
        shard = self.schedule.shard(positions[micro])
        batch = next(batches(self.examples, [shard], self.collator, self.device))
        out = policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        nll = -out.sums / out.counts.clamp(min=1)
        if shard.stand_in:  # no retain example for this process here: run one, count nothing (schedule.Shard)
            return nll.sum() * 0.0
        stats.add("retain/nll", float(nll.detach().sum()), nll.shape[0])
        return self.weight * nll.sum() * self.world / total
