"""Shared inputs and helpers of the objectives' golden-value tests (see the test files' docstrings)."""
from __future__ import annotations

import math
import random

import torch

PAIRS = {
    "policy_chosen_logps": [-1.0, -4.0],
    "chosen_tokens": [2, 4],
    "policy_rejected_logps": [-2.0, -3.0],
    "rejected_tokens": [4, 2],
    "reference_chosen_logps": [-1.5, -3.0],
    "reference_rejected_logps": [-1.5, -3.5],
}
NAN = float("nan")


def softplus(x: float) -> float:
    """log(1 + e^x) = -log σ(-x), without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def tensors(values: dict, dtype: torch.dtype = torch.float64) -> dict:
    """Lists -> tensors: token counts long, masks/labels bool, everything else ``dtype``."""
    out = {}
    for key, value in values.items():
        if key.endswith("tokens"):
            out[key] = torch.tensor(value)
        elif key in ("mask", "labels"):
            out[key] = torch.tensor(value, dtype=torch.bool)
        else:
            out[key] = torch.tensor(value, dtype=dtype)
    return out


def assert_values(tensor: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype), rtol=tol, atol=tol, equal_nan=True)


def random_pairs(seed: int, batch: int = 16) -> dict:
    """Summed log-probs -U(1, 50), token counts 1..40, as plain lists."""
    rng = random.Random(seed)
    return {key: [rng.randint(1, 40) for _ in range(batch)] if key.endswith("_tokens")
            else [-rng.uniform(1, 50) for _ in range(batch)] for key in PAIRS}


def pair_logratios(p: dict) -> tuple[list[float], list[float]]:
    h_c = [a - b for a, b in zip(p["policy_chosen_logps"], p["reference_chosen_logps"], strict=True)]
    h_r = [a - b for a, b in zip(p["policy_rejected_logps"], p["reference_rejected_logps"], strict=True)]
    return h_c, h_r


def random_group(seed: int, batch: int = 16, slots: int = 1, ragged: bool = False) -> dict:
    """(B, K) log-probs -U(1, 50) with a mask; ``ragged`` drops trailing slots at random, keeping at least 2."""
    rng = random.Random(seed)
    present = [rng.randint(2, slots) if ragged else slots for _ in range(batch)]
    mask = [[k < n for k in range(slots)] for n in present]
    return {
        "policy_logps": [[-rng.uniform(1, 50) if m else 0.0 for m in row] for row in mask],
        "reference_logps": [[-rng.uniform(1, 50) if m else 0.0 for m in row] for row in mask],
        "tokens": [[rng.randint(1, 40) if m else 1 for m in row] for row in mask],
        "mask": mask,
    }


def group_logratios(g: dict) -> list[list[float]]:
    return [[a - b for a, b in zip(pa, re, strict=True)] for pa, re in zip(g["policy_logps"], g["reference_logps"],
                                                                          strict=True)]


