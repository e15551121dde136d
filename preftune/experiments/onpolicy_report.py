"""The on-policy experiment's report: a table per method (reward and KL of every round) and a two-panel plot
(mean reward against round, and against KL(π‖π_0), one line per method)."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import write_text

COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _points(report: dict) -> list[tuple[int, dict]]:
    return [(r["round"], r["evaluation"]) for r in report["rounds"] if r.get("evaluation")]


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
        points = [(t, e) for t, e in _points(method) if "reward" in e]
        if not points:
            continue
        rounds, rewards = [t for t, _ in points], [e["reward"] for _, e in points]
        errors = [e["reward_stderr"] for _, e in points]
        kls, kl_errors = [e["kl"] for _, e in points], [e["kl_stderr"] for _, e in points]
        by_round.errorbar(rounds, rewards, yerr=errors, color=colour, marker="o", capsize=3, label=name)
        by_kl.errorbar(kls, rewards, xerr=kl_errors, yerr=errors, color=colour, marker="o", capsize=3, label=name)
        for (t, _), x, y in zip(points, kls, rewards, strict=True):
            by_kl.annotate(str(t), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=colour)
    by_round.set(xlabel="round (0 = starting policy)", ylabel="mean reward (held-out prompts)")
    by_kl.set(xlabel="KL(π‖π_0) (nats, from samples)", ylabel="mean reward (held-out prompts)")
    for ax in (by_round, by_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=130)
    plt.close(fig)
