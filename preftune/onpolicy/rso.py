"""RSO: Liu et al. 2024, "Statistical Rejection Sampling Improves Preference Optimization" (ICLR 2024).

The optimal policy of the KL-regularised reward objective is π*(y|x) ∝ π_sft(y|x)·exp(r(x, y)/β) (§3).
Rejection sampling with π_sft as the proposal draws from it: a candidate y ~ π_sft is accepted with
probability π*(y)/(M·π_sft(y)) = exp((r(y) - r_max)/β), where r_max bounds the reward (§3.1). Algorithm 1 of
the paper runs this on N candidates already sampled from π_sft, with r_max the largest reward among the
candidates not yet accepted, and draws without replacement until M are accepted; as N grows it draws from π*.
Then pairs are formed among the accepted samples and labelled by the reward model; the paper's
"tournament-rank" (§4, Table 3) is a single-elimination tournament: samples meet in pairs, winners meet
winners, and every match is a training pair (M - 1 pairs from M samples).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def acceptance_probabilities(rewards: Sequence[float], beta: float, max_reward: float | None = None) -> list[float]:
    """exp((r_i - r_max)/β) per candidate (§3.1); ``max_reward`` defaults to the largest of ``rewards``."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    top = max(rewards) if max_reward is None else max_reward
    if any(r > top for r in rewards):
        raise ValueError(f"max_reward {top} is below a candidate's reward; it must bound every reward")
    return [math.exp((r - top) / beta) for r in rewards]


def rejection_sample(rewards: Sequence[float], num_samples: int, beta: float, rng: random.Random) -> list[int]:
    """Algorithm 1: indices of ``num_samples`` candidates accepted without replacement (in acceptance order).

    Each pass visits the remaining candidates in order and accepts candidate i with probability
    exp((r_i - r_max)/β), r_max the largest remaining reward (so every pass accepts at least the best one, and
    the loop ends). ``num_samples`` larger than the candidates takes them all.
    """
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    want = min(num_samples, len(remaining))
    while len(accepted) < want:
        top = max(rewards[i] for i in remaining)
        kept = []
        for i in remaining:
            if len(accepted) < want and rng.random() < math.exp((rewards[i] - top) / beta):
                accepted.append(i)
            else:
                kept.append(i)
        remaining = kept
    return accepted


def tournament_pairs(rewards: Sequence[float], rng: random.Random) -> list[tuple[int, int]]:
    """(winner, loser) indices of a single-elimination tournament in a random bracket: every match is a pair.
    A tie is decided by the bracket order (the first of the two wins); an odd one out gets a bye."""
    players = list(range(len(rewards)))
    rng.shuffle(players)
    pairs = []
    while len(players) > 1:
        winners = []
        for a, b in zip(players[0::2], players[1::2], strict=False):
            win, lose = (a, b) if rewards[a] >= rewards[b] else (b, a)
            pairs.append((win, lose))
            winners.append(win)
        if len(players) % 2:
            winners.append(players[-1])
        players = winners
    return pairs
