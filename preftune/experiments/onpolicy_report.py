"""The on-policy experiment's report: a table per method (reward and KL of every round) and a two-panel plot
(mean reward against optimizer updates so far, and against KL(π‖π_0); one line per method, a point per round)."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import write_text

COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _points(report: dict) -> list[tuple[int, int, dict]]:
    """(round, optimizer updates so far, evaluation) of every evaluated round."""
    points, steps = [], 0
    for r in report["rounds"]:
        steps += r.get("train_steps", 0)
        if r.get("evaluation"):
            points.append((r["round"], steps, r["evaluation"]))
    return points


def format_markdown(report: dict) -> str:
    lines = [f"# On-policy rounds against offline DPO ({report['policy']})", "",
             "| method | round | train rows | optimizer steps (cumulative) | mean reward | KL(π‖π_0) (nats) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, method in report["methods"].items():
        steps = 0
        for r in method["rounds"]:
            steps += r.get("train_steps", 0)
            e = r.get("evaluation") or {}
            rows = r.get("rows", {}).get("rows", "–")
            reward = f"{e['reward']:.3f} ± {e['reward_stderr']:.3f}" if "reward" in e else "–"
            kl = f"{e['kl']:.2f} ± {e['kl_stderr']:.2f}" if e else "–"
            lines.append(f"| {name} | {r['round']} | {rows} | {steps} | {reward} | {kl} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    write_text(out / "report.md", format_markdown(report))
    fig, (by_round, by_kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for colour, (name, method) in zip(COLOURS * 3, report["methods"].items(), strict=False):
        points = [(t, n, e) for t, n, e in _points(method) if "reward" in e]
        if not points:
            continue
        steps, rewards = [n for _, n, _ in points], [e["reward"] for _, _, e in points]
        errors = [e["reward_stderr"] for _, _, e in points]
        kls, kl_errors = [e["kl"] for _, _, e in points], [e["kl_stderr"] for _, _, e in points]
        by_round.errorbar(steps, rewards, yerr=errors, color=colour, marker="o", capsize=3, label=name)
        by_kl.errorbar(kls, rewards, xerr=kl_errors, yerr=errors, color=colour, marker="o", capsize=3, label=name)
        for (t, _, _), x, n, y in zip(points, kls, steps, rewards, strict=True):
            by_kl.annotate(f"round {t}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=colour)
            by_round.annotate(f"round {t}", (n, y), textcoords="offset points", xytext=(4, -10), fontsize=8, color=colour)
    by_round.set(xlabel="optimizer updates so far (each point: the policy after a round)",
                 ylabel="mean reward (held-out prompts)")
    by_kl.set(xlabel="KL(π‖π_0) (nats, from samples)", ylabel="mean reward (held-out prompts)")
    for ax in (by_round, by_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=130)
    plt.close(fig)
