"""The frontier's outputs: ``frontier.json`` (every number), ``frontier.md`` (the report) and ``frontier.png``
(reward against KL, one marker per point, the points of a family joined in order of KL)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

# One colour and marker per family, so the same method looks the same in every plot.
STYLE = {
    "best_of_n": ("#7f7f7f", "s"), "dpo": ("#d62728", "o"), "ipo": ("#1f77b4", "^"), "simpo": ("#2ca02c", "D"),
    "sft": ("#9467bd", "v"), "unlikelihood": ("#8c564b", "P"),
}
FAMILY_NAMES = {"best_of_n": "Best-of-N", "dpo": "DPO", "ipo": "IPO", "simpo": "SimPO", "sft": "Preferred-FT",
                "unlikelihood": "Unlikelihood"}
OTHER_COLOURS = ("#e377c2", "#bcbd22", "#17becf", "#ff7f0e")


def _family_name(family: str) -> str:
    return FAMILY_NAMES.get(family, family)


def _params(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.get("params", {}).items()) or "–"


def _pm(value: float | None, err: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if err is None or (isinstance(err, float) and math.isnan(err)) or err == 0:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {err:.{digits}f}"


def format_table(points: list[dict]) -> str:
    """Markdown table of the points, best-of-n first, then in config order."""
    lines = ["| method | settings | KL(π‖π_ref) (nats) | mean reward | tokens | train (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for p in points:
        tokens = f"{p['mean_tokens']:.1f}" if p.get("mean_tokens") is not None else "–"
        seconds = f"{p['train_seconds']:.0f}" if p.get("train_seconds") is not None else "–"
        lines.append(f"| {p['label']} ({_family_name(p['family'])}) | {_params(p)} | {_pm(p['kl'], p.get('kl_stderr'))} "
                     f"| {_pm(p['reward'], p.get('reward_stderr'))} | {tokens} | {seconds} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Reward against KL; error bars are one standard error (the KL of Best-of-N is exact, so it has none)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    families: dict[str, list[dict]] = {}
    for point in report["points"]:
        families.setdefault(point["family"], []).append(point)
    extra = iter(OTHER_COLOURS * 4)
    for family, points in families.items():
        colour, marker = STYLE.get(family) or (next(extra), "X")
        points = sorted(points, key=lambda p: p["kl"])
        xs, ys = [p["kl"] for p in points], [p["reward"] for p in points]
        ax.errorbar(xs, ys, xerr=[p.get("kl_stderr") or 0 for p in points],
                    yerr=[p.get("reward_stderr") or 0 for p in points], color=colour, marker=marker, markersize=7,
                    linestyle="-" if len(points) > 1 else "none", linewidth=1.2, capsize=2,
                    label=_family_name(family))
        for p in points:
            note = ", ".join(f"{k}={v}" for k, v in p.get("params", {}).items() if k in ("beta", "n"))
            if note and len(points) > 1:
                ax.annotate(note, (p["kl"], p["reward"]), textcoords="offset points", xytext=(5, -11), fontsize=7,
                            color=colour)
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence (held-out prompts)")
    ax.set_ylabel("mean reward (sentiment reward model)")
    ax.set_title(f"{report['title']}: {report['policy']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    sentiment = (report.get("reward_model") or {}).get("sentiment") or {}
    pairs = report.get("pairs", {})
    s, e = report["sampling"], report["evaluation"]
    lines = [f"# {report['title']}", "",
             f"Policy `{report['policy']}`; {report['prompts']['train']} train prompts, {report['prompts']['eval']} "
             f"held-out prompts (review prefixes); continuations of at most {s['max_new_tokens']} tokens.", ""]
    if sentiment:
        lines += [f"Ground-truth reward: the sentiment reward model, held-out sign accuracy "
                  f"**{sentiment['sign_accuracy']:.3f}** on {sentiment['held_out_snippets']} rated snippets.", ""]
    lines += [f"Preference pairs: {pairs.get('rows_written', '?')} (best vs worst of the starting policy's samples; "
              f"{pairs.get('all_tied_prompts', 0)} prompts gave none: every sample tied). Every trained point is evaluated on {e['num_samples']} samples "
              "per held-out prompt at temperature 1; KL is the mean of log π(y|x) − log π_ref(y|x) over them.", "",
              "![reward against KL](frontier.png)", "", format_table(report["points"]), "",
              "± is one standard error. Best-of-N's KL is the closed form log N − (N − 1)/N.", "", "Wall time (s): " +
              ", ".join(f"{k} {v}" for k, v in report.get("seconds", {}).items()), ""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    """frontier.json, frontier.md and frontier.png in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("frontier.json", json.dumps(report, indent=2) + "\n"), ("frontier.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    plot(report, out / "frontier.png")
