"""Preference pairs from rated texts, so that the Bradley–Terry trainer builds a sentiment reward model.

The bundled movie-review snippets (Hutto & Gilbert, ICWSM 2014: 10,604 Rotten Tomatoes sentences, each the
mean rating of 20+ people on -4..+4) carry no preferences, only ratings. Two snippets whose ratings differ by
at least ``min_gap`` make a pair, the higher rated one chosen. Snippets are split into train and held-out
*before* pairing, so no held-out snippet is ever seen in training, and the held-out split also measures what
the frontier experiment needs: **sign accuracy**, reward above a threshold <-> rating above 0, the threshold
chosen on the train snippets (a Bradley–Terry reward is defined up to a constant, so 0 means nothing).
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .snippets import Snippet, read_snippets


@dataclass
class SentimentPairsConfig:
    enabled: bool = True  # build data.train_file / data.eval_file from rated snippets before training
    file: str = ""  # TSV with a header and columns id, sentiment, text; "" = the bundled movie snippets
    min_gap: float = 1.0  # two ratings at least this far apart make a pair
    pairs_per_snippet: int = 4  # partners drawn for every snippet (duplicates dropped)
    eval_fraction: float = 0.2  # snippets held out (pairs among them only)
    prompt: str = "Movie review:"  # the pair files need a prompt; model.include_prompt: false ignores it
    seed: int = 0


@dataclass
class SentimentData:
    train: list[Snippet]
    held_out: list[Snippet]
    train_file: Path
    eval_file: Path


def split_rated(items: list[Snippet], fraction: float, seed: int) -> tuple[list[Snippet], list[Snippet]]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(items)))
    held = set(order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def rated_pairs(items: list[Snippet], min_gap: float, per_item: int, seed: int) -> list[tuple[Snippet, Snippet]]:
    """(chosen, rejected) pairs: each item is paired with ``per_item`` partners drawn uniformly among those
    rated at least ``min_gap`` away (found by bisection in the sorted ratings), each unordered pair once."""
    ranked = sorted(items, key=lambda x: x.rating)
    ratings = [x.rating for x in ranked]
    rng = random.Random(seed)
    seen, pairs = set(), []
    for i, item in enumerate(ranked):
        low = bisect.bisect_right(ratings, item.rating - min_gap)  # ranked[:low] are far enough below
        high = bisect.bisect_left(ratings, item.rating + min_gap)  # ranked[high:] are far enough above
        far = low + len(ranked) - high
        for _ in range(min(per_item, far)):
            pick = rng.randrange(far)
            j = pick if pick < low else high + pick - low
            key = (min(i, j), max(i, j))
            if key not in seen:
                seen.add(key)
                pairs.append((ranked[j], item) if j >= high else (item, ranked[j]))
    return pairs


def _write_pairs(path: Path, pairs: list[tuple[Snippet, Snippet]], prompt: str) -> None:
    rows = [{"prompt": prompt, "chosen": c.text, "rejected": r.text, "score_chosen": c.rating,
             "score_rejected": r.rating} for c, r in pairs]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_sentiment_pairs(config: SentimentPairsConfig, folder: str | Path) -> SentimentData:
    """Split, pair and write ``train_pairs.jsonl`` / ``eval_pairs.jsonl`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, held_out = split_rated(read_snippets(config.file), config.eval_fraction, config.seed)
    files = folder / "train_pairs.jsonl", folder / "eval_pairs.jsonl"
    for items, path, salt in ((train, files[0], 0), (held_out, files[1], 1)):
        pairs = rated_pairs(items, config.min_gap, config.pairs_per_snippet, config.seed * 2 + salt)
        if not pairs:
            raise ValueError(f"no two snippets are rated {config.min_gap} apart; lower sentiment_pairs.min_gap")
        _write_pairs(path, pairs, config.prompt)
    return SentimentData(train, held_out, *files)


def calibrate_threshold(rewards: torch.Tensor, positive: torch.Tensor) -> float:
    """The threshold t maximising the accuracy of (reward > t) <-> positive; candidates are the midpoints
    between consecutive sorted rewards (and below the lowest). rewards: (N,) float; positive: (N,) bool."""
    values, order = rewards.double().sort()
    pos = positive[order].double()
    # predicting positive for items k.. (threshold between k-1 and k): right = negatives below + positives from k
    neg_below = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - pos).cumsum(0)])
    pos_from = torch.cat([pos.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    right = neg_below + pos_from
    right[1:-1][values[1:] == values[:-1]] = -1  # no threshold fits between equal rewards
    k = int(right.argmax())
    if k == 0:
        return float(values[0]) - 1.0
    if k == len(values):
        return float(values[-1])
    return float((values[k - 1] + values[k]) / 2)


def sign_accuracy(train_rewards: torch.Tensor, train_ratings: torch.Tensor, held_rewards: torch.Tensor,
                  held_ratings: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy of (reward > t) <-> (rating > 0), t calibrated on train; rating 0 is neither
    sign, so those snippets are left out (and counted)."""
    train_signed, held_signed = train_ratings != 0, held_ratings != 0
    threshold = calibrate_threshold(train_rewards[train_signed], train_ratings[train_signed] > 0)
    right = (held_rewards[held_signed] > threshold) == (held_ratings[held_signed] > 0)
    train_right = (train_rewards[train_signed] > threshold) == (train_ratings[train_signed] > 0)
    return {"sign_accuracy": float(right.float().mean()), "sign_threshold": threshold,
            "train_sign_accuracy": float(train_right.float().mean()), "held_out_snippets": int(held_signed.sum()),
            "neutral_snippets_left_out": int((~held_signed).sum())}
