"""The frontier's outputs: ``frontier.json`` (every number), ``frontier.md`` (the report) and ``frontier.png``
(reward against KL, one marker per point, the points of a family joined in order of KL)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ...atomic import write_json, write_text

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
    positive = any("positive" in p for p in points)
    lines = ["| method | settings | KL(π‖π_ref) (nats) | mean reward | " + ("positive | " if positive else "")
             + "tokens | train (s) |", "| --- | --- | ---: | ---: | " + ("---: | " if positive else "") + "---: | ---: |"]
    for p in points:
        tokens = f"{p['mean_tokens']:.1f}" if p.get("mean_tokens") is not None else "–"
        seconds = f"{p['train_seconds']:.0f}" if p.get("train_seconds") is not None else "–"
        share = f"{_pm(p.get('positive'), p.get('positive_stderr'))} | " if positive else ""
        lines.append(f"| {p['label']} ({_family_name(p['family'])}) | {_params(p)} | {_pm(p['kl'], p.get('kl_stderr'))} "
                     f"| {_pm(p['reward'], p.get('reward_stderr'))} | {share}{tokens} | {seconds} |")
    return "\n".join(lines)


def _panel(ax, report: dict, key: str, ylabel: str) -> None:
    """One family per colour and marker, its points joined in order of KL; error bars are one standard error
    (the KL of Best-of-N is exact, so it has none)."""
    families: dict[str, list[dict]] = {}
    for point in report["points"]:
        families.setdefault(point["family"], []).append(point)
    extra = iter(OTHER_COLOURS * 4)
    for family, points in families.items():
        colour, marker = STYLE.get(family) or (next(extra), "X")
        points = sorted(points, key=lambda p: p["kl"])
        ax.errorbar([p["kl"] for p in points], [p[key] for p in points],
                    xerr=[p.get("kl_stderr") or 0 for p in points], yerr=[p.get(f"{key}_stderr") or 0 for p in points],
                    color=colour, marker=marker, markersize=7, linestyle="-" if len(points) > 1 else "none",
                    linewidth=1.2, capsize=2, label=_family_name(family))
        for p in points:
            note = ", ".join(f"{k}={v}" for k, v in p.get("params", {}).items() if k in ("beta", "n"))
            if note and len(points) > 1:
                ax.annotate(note, (p["kl"], p[key]), textcoords="offset points", xytext=(5, -11), fontsize=7,
                            color=colour)
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence (held-out prompts)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot(report: dict, path: Path) -> None:
    """Mean reward against KL, and beside it the fraction of samples read as positive when the reward model
    has a sign threshold."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    positive = all("positive" in p for p in report["points"])
    fig, axes = plt.subplots(1, 2 if positive else 1, figsize=(13 if positive else 7.5, 5), dpi=120, squeeze=False)
    _panel(axes[0][0], report, "reward", "mean reward (sentiment reward model)")
    if positive:
        _panel(axes[0][1], report, "positive", "fraction of samples read as positive")
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{report['title']}: {report['policy']}", fontsize=11)
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
                  f"**{sentiment['sign_accuracy']:.3f}** on {sentiment['held_out_snippets']} rated snippets "
                  f"(sign threshold {sentiment['sign_threshold']:.3f}).", ""]
    lines += [f"Preference pairs: {pairs.get('rows_written', '?')} (best vs worst of the starting policy's samples; "
              f"prompts whose samples all tied, so no pair: {pairs.get('all_tied_prompts', 0)}). Every trained point is evaluated on {e['num_samples']} samples "
              "per held-out prompt at temperature 1; KL is the mean of log π(y|x) − log π_ref(y|x) over them.", "",
              "![reward against KL](frontier.png)", "", format_table(report["points"]), "",
              "± is one standard error. Best-of-N's KL is the closed form log N − (N − 1)/N. *positive*: the "
              "fraction of samples whose reward is above the reward model's sign threshold (calibrated on the train "
              "snippets: above it, a review reads as positive).", "", "Wall time (s): " +
              ", ".join(f"{k} {v}" for k, v in report.get("seconds", {}).items()), ""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    """frontier.json, frontier.md and frontier.png in ``out``, each written atomically."""
    write_json(out / "frontier.json", report)
    write_text(out / "frontier.md", markdown(report))
    plot(report, out / "frontier.png")
