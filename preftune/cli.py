"""``preftune <command> CONFIG [dotted.key=value ...]``.

Each command is one row of ``COMMANDS``: its help text and the function that runs it. A handler takes the
parsed arguments and returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, ObjectiveConfig, describe_options, load_config, with_objective


def _print_metrics(title: str, metrics: dict | None) -> None:
    if metrics:
        print(title)
        for key, value in metrics.items():
            print(f"  {key:32s} {value:.4f}")


def run_train(args: argparse.Namespace) -> int:
    from .training import train

    config = load_config(args.config, args.overrides)  # the recipe as written, its objective included, is checked
    if args.command == "sft":
        config = with_objective(config, "sft")
    result = train(config, command=args.command)
    from .training.distributed import is_main_process

    if not is_main_process():  # launched on several processes: the main one reports
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted at step {result.steps}; a checkpoint is in {result.run_dir / 'checkpoints'} "
              "(run the same command again to resume)")
        return 130
    _print_metrics("held-out metrics before training:", result.eval_before)
    _print_metrics("held-out metrics after training:", result.eval_after)
    print(f"run directory: {result.run_dir}\nfinal model: {result.final_dir}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """A training recipe: held-out pair metrics of its model. A generations recipe (``model_file:``, see
    configs/winrate.yaml): win rate, mean reward, KL and lengths, exactly as ``preftune winrate``."""
    from .config import load_yaml

    if "model_file" in load_yaml(args.config, args.overrides):
        return _lazy("preftune.evaluation.winrate:command")(args)
    from .evaluation.heldout import evaluate_model, report_path

    config = load_config(args.config, args.overrides)
    print(json.dumps(evaluate_model(config), indent=2))
    print(f"written to {report_path(config)}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .experiments.demo import run_demo as demo

    demo(args.overrides)
    return 0


def _lazy(spec: str):
    """``"module:attribute"`` imported on first use: keeps `preftune --help` from loading transformers."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Command:
    help: str
    handler: Callable[[argparse.Namespace], int] | str  # a function, or "module:function" imported when run
    example: str  # overrides shown in the command's help
    takes_config: bool = True
    config_type: type | str | None = Config  # its options, listed by --help
    defaults: Callable[[], object] | None = None  # the instance whose values --help shows (default: the type's)


COMMANDS: dict[str, Command] = {
    "train": Command("preference optimization with the config's objective (DPO by default)", run_train,
                     "objective.beta=0.2 training.learning_rate=1e-6"),
    "sft": Command("supervised fine-tuning: the same loop with the NLL objective on prompt/completion data", run_train,
                   "training.learning_rate=1e-5 lora.enabled=true",
                   defaults=lambda: Config(objective=ObjectiveConfig(name="sft"))),
    "eval": Command("held-out pair metrics (reward accuracy, margins, log-probs, SimPO's likelihood-length analysis) "
                    "of a model; given a winrate recipe (model_file: ...), the same report as `preftune winrate`",
                    run_eval, "model.name_or_path=runs/dpo/final"),
    "demo": Command("the embedded default: SmolLM2-135M-Instruct + DPO/LoRA on movie-review preference pairs",
                    run_demo, "demo.n_train=256 training.max_steps=20", takes_config=False),
    "generate": Command("sample K completions per prompt from a model or adapter (HF or vLLM) into resumable JSONL",
                        "preftune.feedback.generate:command", "sampling.num_samples=8 sampling.temperature=1.0",
                        config_type="preftune.feedback.generate:GenerateConfig"),
    "label": Command("judge generations into preference pairs, ranked lists or unpaired labels (AI feedback)",
                     "preftune.feedback.label:command", "format=all_pairs judge.batch_size=8",
                     config_type="preftune.feedback.label:LabelConfig"),
    "revise": Command("Constitutional AI's critique -> revision: a chat model rewrites its answers against principles "
                      "drawn from a constitution; the revisions are SFT data",
                      "preftune.feedback.revise:command", "revisions=2",
                      config_type="preftune.feedback.revise:ReviseConfig"),
    "reward": Command("train a Bradley-Terry reward model (a scalar head on any backbone) from pairs or ranked lists",
                      "preftune.reward.train:command", "training.epochs=2 model.freeze_backbone=true",
                      config_type="preftune.reward.train:RewardConfig"),
    "sentiment-reward": Command("the frontier's sentiment reward model: pairs from the rated movie snippets, a "
                                "reward model on them, its held-out sign accuracy",
                                "preftune.experiments.sentiment_reward:command", "sentiment_pairs.min_gap=2.0",
                                config_type="preftune.experiments.sentiment_reward:SentimentRewardConfig"),
    "winrate": Command("evaluate generations: win rate vs a baseline under a judge, mean reward, KL(pi||ref), lengths",
                       "preftune.evaluation.winrate:command", "bootstrap.samples=2000",
                       config_type="preftune.evaluation.winrate:WinrateConfig"),
    "frontier": Command("the DPO paper's controlled-sentiment experiment: reward vs KL of DPO, IPO, SimPO, ... plotted",
                        "preftune.experiments.frontier.run:command", "prompts.train=64 evaluation.num_samples=2",
                        config_type="preftune.experiments.frontier.config:FrontierConfig"),
    "iterate": Command("rounds of on-policy preference optimization: sample from the policy, judge, train "
                       "(iterative DPO, DNO, SPPO); resumable at every stage of every round",
                       "preftune.onpolicy.rounds:command", "rounds=3 sampling.num_samples=8",
                       config_type="preftune.onpolicy.rounds_config:IterateConfig"),
    "rso": Command("statistical rejection sampling optimization: reward model, N candidates from the SFT policy, "
                   "samples of pi* by rejection, tournament pairs, hinge or DPO",
                   "preftune.onpolicy.rso_run:command", "rso.beta=0.5",
                   config_type="preftune.onpolicy.rso_run:RSOConfig"),
    "online": Command("online preference optimization: each step samples from the policy itself, a judge picks, "
                      "and the objective trains at once (online DPO/IPO/SLiC, SPO)",
                      "preftune.onpolicy.online:command", "training.max_steps=100",
                      config_type="preftune.onpolicy.online_config:OnlineRecipe"),
    "zephyr": Command("the Zephyr recipe: distilled SFT on a teacher's answers, a pool of models judged into "
                      "best-vs-random pairs, then DPO", "preftune.experiments.zephyr:command", "dpo.beta=0.1",
                      config_type="preftune.experiments.zephyr:ZephyrConfig"),
    "onpolicy-sentiment": Command("on-policy rounds (iterative DPO, SPPO, ...) against one round of offline DPO on the "
                                  "controlled-sentiment task: reward and KL per round, plotted",
                                  "preftune.experiments.onpolicy_sentiment:command", "rounds=2",
                                  config_type="preftune.experiments.onpolicy_sentiment:OnPolicySentimentConfig"),
}


def _objective_parameters(prefix: str, section) -> list[str]:
    """The objective's own parameters with their defaults, as flat keys (``objective.beta = 0.1``)."""
    import dataclasses

    from .objectives import get_objective

    objective = get_objective(section.name)
    lines = [f"{prefix}{f.name} = {f.default!r}" for f in dataclasses.fields(objective.params)]
    return lines + [f"{prefix}<parameter> = ...  (another objective's parameters: python -m preftune.objectives.catalog)"]


def _judge_kinds(prefix: str, section) -> list[str]:
    """Each kind of judge (``judge.type``) and the keys it takes."""
    from .feedback.judges import JUDGES, judge_class

    lines = [f"{prefix}judge.type = one of {', '.join(JUDGES)}  (the other judge keys belong to that kind:)"]
    for kind in JUDGES:
        lines.append(f"  {prefix}judge (type: {kind}):")
        lines.append(describe_options(judge_class(kind).Config, f"    {prefix}judge."))
    return lines


def _epilog(command: Command) -> str | None:
    config_type = _lazy(command.config_type) if isinstance(command.config_type, str) else command.config_type
    if config_type is None:
        return None
    defaults = command.defaults() if command.defaults else None
    options = describe_options(config_type, defaults=defaults,
                               expand={"params": _objective_parameters, "judge": _judge_kinds})
    return "config keys (section.key = default); override any of them as key=value:\n" + options


def _parser(with_options: bool) -> argparse.ArgumentParser:
    """``with_options``: list every command's config keys in its help (imports each command's module)."""
    parser = argparse.ArgumentParser(prog="preftune", description="Align causal LMs with preference data.")
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help,
                           epilog=_epilog(command) if with_options else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if command.takes_config:
            p.add_argument("config", type=Path, help="YAML recipe (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {command.example}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(with_options="-h" in argv or "--help" in argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per judge request otherwise
    handler = COMMANDS[args.command].handler
    return _run_handled(args.command, _lazy(handler) if isinstance(handler, str) else handler, args)


def run() -> int:
    """The process's entry point (the ``preftune`` command, ``python -m preftune``): ``main`` on the command line,
    then, after a command that succeeded on several processes, the process group is ended while the
    interpreter is still whole. Left to interpreter shutdown, gloo's worker threads can be torn down
    mid-flight: the process dies with SIGABRT ("terminate called without an active exception") after all its
    work is written and the launcher reports the job as failed (3 of 60 exits of a 2-process gloo job that
    ended right after its last collective; none of 40 with the group ended). Not after a
    failure: another process may still be inside a collective. ``main`` itself never ends the group, so a
    program may call it for several commands in a row."""
    code = main()
    if code == 0:
        _end_process_group()
    return code


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run_handled(command: str, handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Every command's errors the same way: bad config or input is a one-line message and exit code 2, a judge
    that cannot work at all is exit code 1, an interrupt is exit code 130 (every command keeps its finished
    work: the same command resumes)."""
    from .feedback.judges import JudgeError

    try:
        return handler(args)
    except ConfigError as exc:
        print(f"preftune: config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:  # bad input: a message, not a traceback
        print(f"preftune: error: {exc}", file=sys.stderr)
        return 2
    except JudgeError as exc:
        print(f"preftune: judge error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"preftune {command}: interrupted; finished work is kept: run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
