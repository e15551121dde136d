"""``preftune <command> CONFIG [dotted.key=value ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, describe_options, load_config

COMMANDS = {
    "train": "preference optimization with the config's objective (DPO by default)",
    "sft": "supervised fine-tuning: the same loop with the NLL objective on prompt/completion data",
    "eval": "held-out pair metrics (reward accuracy, margins, log-probs) of a trained or base model",
    "demo": "the embedded default: SmolLM2-135M-Instruct + DPO/LoRA on movie-review preference pairs",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Align causal LMs with preference data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    epilog = "config keys (section.key = default); override any of them as key=value:\n" + describe_options()
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name != "demo":
            p.add_argument("config", type=Path, help="YAML recipe (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. objective.beta=0.2")
    return parser


def _print_metrics(title: str, metrics: dict | None) -> None:
    if metrics:
        print(title)
        for key, value in metrics.items():
            print(f"  {key:32s} {value:.4f}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.overrides)
            return 0
        config = load_config(args.config, args.overrides)
        if args.command == "eval":
            from .evaluation import evaluate_model

            metrics = evaluate_model(config)
            print(json.dumps(metrics, indent=2))
            return 0
        from .trainer import train

        if args.command == "sft":
            config.objective.name, config.objective.params = "sft", {}
        result = train(config, command=args.command)
    except ConfigError as exc:
        print(f"preftune: config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"preftune: error: {exc}", file=sys.stderr)
        return 2
    if result.interrupted:
        print(f"interrupted at step {result.steps}; a checkpoint is in {result.run_dir / 'checkpoints'} "
              "(run the same command again to resume)")
        return 130
    _print_metrics("held-out metrics before training:", result.eval_before)
    _print_metrics("held-out metrics after training:", result.eval_after)
    print(f"run directory: {result.run_dir}\nfinal model: {result.final_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
