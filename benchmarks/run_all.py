"""``make bench``: every benchmark, side by side, in one invocation; JSON + the README table.

    python benchmarks/run_all.py [--threads 2] [--repeats 2] [--only tiny-8k,sampling [--merge]]

Training (``bench_dpo.py``): tiny Llama with an 8k and a 32k vocabulary and with ~500-token prompts, in
fp32 and bf16; SmolLM2-135M-Instruct with LoRA r16 on all projections in bf16. Sampling
(``bench_sampling.py``): ``preftune generate`` against ``model.generate`` on SmolLM2-135M. The bf16
fraction of peak (``bench_peak.py``): FLOPs of a SmolLM2 LoRA step over its time, against the measured
matmul peak. Results go to ``benchmarks/results/speed.json``; the table is printed and written between the
markers in ``benchmarks/README.md``. ``--merge`` keeps the earlier results of what a subset did not run
(rows are replaced by workload and precision) and lists each partial run under ``partial_runs``. Timings
on shared cores are noisy: repeats alternate the order of the two systems, ratios come from medians, and
the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import system_info  # noqa: E402

RESULTS = HERE / "results" / "speed.json"
README = HERE / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
TRAINING = [("tiny-8k", "fp32"), ("tiny-8k", "bf16"), ("tiny-32k", "fp32"), ("tiny-32k", "bf16"),
            ("tiny-long", "fp32"), ("tiny-long", "bf16"), ("smollm2-lora", "bf16")]
TARGETS = {("tiny-long", "fp32"): ("speedup", 5.0), ("tiny-8k", "fp32"): ("speedup", 4.0),
           ("smollm2-lora", "bf16"): ("speedup", 3.0)}
MEMORY_TARGETS = {"tiny-32k": 0.35, "smollm2-lora": 0.7}


def _training_rows(results: list[dict]) -> list[str]:
    rows = ["| workload | precision | preftune s/step | TRL s/step | speedup | TRL/preftune FLOPs | preftune peak RSS "
            "| TRL peak RSS | memory ratio |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        p, t = r["preftune"], r.get("trl")
        if t is None:
            rows.append(f"| {r['workload']['name']} | {r['precision']} | {p['seconds_per_step']:.2f} | - | - | - | "
                        f"{p['peak_rss_mb']:,.0f} MB | - | - |")
            continue
        flops = f"{r['flops_ratio_trl_over_preftune']:.2f}" if r.get("flops_ratio_trl_over_preftune") else "-"
        rows.append(f"| {r['workload']['name']} | {r['precision']} | {p['seconds_per_step']:.2f} | "
                    f"{t['seconds_per_step']:.2f} | {r['speedup']:.2f}x | {flops} | {p['peak_rss_mb']:,.0f} MB | "
                    f"{t['peak_rss_mb']:,.0f} MB | {r['memory_ratio']:.2f} |")
    return rows


def table(report: dict) -> str:
    lines = _training_rows(report.get("training", []))
    sampling = report.get("sampling")
    if sampling:
        lines += ["", "| sampling (SmolLM2-135M) | preftune tokens/s | transformers tokens/s | speedup |",
                  "| --- | ---: | ---: | ---: |",
                  f"| {sampling['settings']} | {sampling['preftune']['tokens_per_second']:.1f} | "
                  f"{sampling['transformers']['tokens_per_second']:.1f} | {sampling['speedup']:.2f}x |"]
    peak = report.get("peak")
    if peak:
        lines += ["", f"SmolLM2-135M LoRA bf16 step: {peak['achieved_gflops']:.1f} GFLOP/s achieved; matmul peak "
                  f"{peak['fp32_peak_gflops']:.1f} GFLOP/s fp32"
                  + (f" ({peak['fp32_onednn_peak_gflops']:.1f} through oneDNN)" if peak.get("fp32_onednn_peak_gflops") else "")
                  + f", {peak['bf16_peak_gflops']:.1f} GFLOP/s bf16 "
                  f"(native bf16 kernels: {peak['native_bf16']}); fraction of the peak its kernels run at: "
                  f"{peak['fraction_of_peak']:.0%}"]
    machine = report["machine"]
    lines += ["", f"{machine['cpus']} CPUs ({', '.join(machine['cpu_flags'])}), {machine['threads_per_system']} threads "
              f"per system, load average {machine['load_average_at_start'][0]:.1f} at start and "
              f"{machine['load_average_at_end'][0]:.1f} at the end; {report['minutes']:.0f} min."]
    for part in report.get("partial_runs", []):
        lines += [f"Rerun since ({part['machine'].get('date', 'date not recorded')}, {part['minutes']:.0f} min): "
                  f"{', '.join(part['only'])}, load average {part['machine']['load_average_at_start'][0]:.1f} at start "
                  f"and {part['machine']['load_average_at_end'][0]:.1f} at the end."]
    return "\n".join(lines)


def targets(report: dict) -> dict:
    out = {}
    for r in report.get("training", []):
        key = (r["workload"]["name"], r["precision"])
        if key in TARGETS and "speedup" in r:
            out[f"{key[0]} {key[1]} speedup >= {TARGETS[key][1]}"] = r["speedup"] >= TARGETS[key][1]
        limit = MEMORY_TARGETS.get(key[0])
        if limit and "memory_ratio" in r and (key[0] != "tiny-32k" or key[1] == "fp32"):
            out[f"{key[0]} {key[1]} memory <= {limit} x TRL"] = r["memory_ratio"] <= limit
    if report.get("sampling"):
        out["sampling >= 2x generate"] = report["sampling"]["speedup"] >= 2.0
    if report.get("peak"):
        out["SmolLM2 bf16 >= 35% of peak"] = report["peak"]["fraction_of_peak"] >= 0.35
    return out


def _write_readme(text: str) -> None:
    readme = README.read_text(encoding="utf-8")
    if START in readme and END in readme:
        head, rest = readme.split(START, 1)
        README.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1], encoding="utf-8")


def merged(earlier: dict, new: dict, ran: list[str]) -> dict:
    """``earlier`` with what ``new`` measured put in its place: training rows by (workload, precision), the
    sampling and peak sections whole; the partial run is recorded with its machine state and duration."""
    out = dict(earlier)
    key = lambda r: (r["workload"]["name"], r["precision"])  # noqa: E731
    fresh = {key(r): r for r in new["training"]}
    out["training"] = [fresh.pop(key(r), r) for r in earlier.get("training", [])] + list(fresh.values())
    for section in ("sampling", "peak"):
        if section in new:
            out[section] = new[section]
    out["partial_runs"] = [*earlier.get("partial_runs", []),
                           {"only": ran, "machine": new["machine"], "minutes": new["minutes"]}]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per system and workload (order alternates)")
    parser.add_argument("--only", default="", help="comma-separated: workload names, 'sampling', 'peak'")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true", help="with --only: replace those results in --output, keep the rest")
    args = parser.parse_args(argv)
    import bench_dpo
    import bench_peak
    import bench_sampling
    from workloads import WORKLOADS

    only = {x for x in args.only.split(",") if x}
    began = time.time()
    report: dict = {"machine": system_info(args.threads), "training": []}
    for name, precision in TRAINING:
        if only and name not in only:
            continue
        repeats = 1 if name == "smollm2-lora" else args.repeats  # minutes per TRL step on CPUs without bf16 units
        report["training"].append(bench_dpo.compare(WORKLOADS[name], precision, args.threads, repeats))
    if not only or "sampling" in only:
        report["sampling"] = bench_sampling.compare(args.threads, args.repeats)
    if not only or "peak" in only:
        smollm2 = next((r for r in report["training"] if r["workload"]["name"] == "smollm2-lora"), None)
        report["peak"] = bench_peak.fraction_of_peak(smollm2, args.threads)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["minutes"] = (time.time() - began) / 60
    if args.merge and args.output.exists():
        report = merged(json.loads(args.output.read_text(encoding="utf-8")), report, sorted(only))
    report["targets_met"] = targets(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = table(report)
    _write_readme(text)
    print("\n" + text + "\n")
    for target, met in report["targets_met"].items():
        print(f"{'met    ' if met else 'NOT met'}  {target}")
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
