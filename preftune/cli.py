"""``preftune <command> CONFIG [dotted.key=value ...]``.

Each command is one row of ``COMMANDS``: its help text and the function that runs it. A handler takes the
parsed arguments and returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, describe_options, load_config


def _print_metrics(title: str, metrics: dict | None) -> None:
    if metrics:
        print(title)
        for key, value in metrics.items():
            print(f"  {key:32s} {value:.4f}")


def run_train(args: argparse.Namespace) -> int:
    from .trainer import train

    config = load_config(args.config, args.overrides)
    if args.command == "sft":
        config.objective.name, config.objective.params = "sft", {}
    result = train(config, command=args.command)
    if result.interrupted:
        print(f"interrupted at step {result.steps}; a checkpoint is in {result.run_dir / 'checkpoints'} "
              "(run the same command again to resume)")
        return 130
    _print_metrics("held-out metrics before training:", result.eval_before)
    _print_metrics("held-out metrics after training:", result.eval_after)
    print(f"run directory: {result.run_dir}\nfinal model: {result.final_dir}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_model

    print(json.dumps(evaluate_model(load_config(args.config, args.overrides)), indent=2))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    demo(args.overrides)
    return 0


# name -> (help, handler, takes a CONFIG argument, help epilog lists the training config keys)
COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int], bool]] = {
    "train": ("preference optimization with the config's objective (DPO by default)", run_train, True),
    "sft": ("supervised fine-tuning: the same loop with the NLL objective on prompt/completion data", run_train, True),
    "eval": ("held-out pair metrics (reward accuracy, margins, log-probs) of a trained or base model", run_eval, True),
    "demo": ("the embedded default: SmolLM2-135M-Instruct + DPO/LoRA on movie-review preference pairs", run_demo, False),
    # imported when run: keeps `preftune --help` from loading transformers
    "generate": ("sample K completions per prompt from a model or adapter (HF or vLLM) into resumable JSONL",
                 lambda args: __import__("preftune.generate", fromlist=["command"]).command(args), True),
    "label": ("judge generations into preference pairs, ranked lists or unpaired labels (AI feedback)",
              lambda args: __import__("preftune.label", fromlist=["command"]).command(args), True),
    "reward": ("train a Bradley-Terry reward model (a scalar head on any backbone) from pairs or ranked lists",
               lambda args: __import__("preftune.reward", fromlist=["command"]).command(args), True),
    "winrate": ("evaluate generations: win rate vs a baseline under a judge, mean reward, KL(pi||ref), lengths",
                lambda args: __import__("preftune.winrate", fromlist=["command"]).command(args), True),
}
TRAINING_COMMANDS = ("train", "sft", "eval", "demo")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Align causal LMs with preference data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training_keys = "config keys (section.key = default); override any of them as key=value:\n" + describe_options()
    for name, (help_text, _, takes_config) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=training_keys if name in TRAINING_COMMANDS else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if takes_config:
            p.add_argument("config", type=Path, help="YAML recipe (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. objective.beta=0.2")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command][1](args)
    except ConfigError as exc:
        print(f"preftune: config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:  # bad input: a message, not a traceback
        print(f"preftune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
