"""``benchmarks/run_all.py --only ... --merge``: a subset's results replace the same rows of the earlier run and
leave the rest, and the table says what was rerun when."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run_all  # noqa: E402


def _row(name: str, precision: str, seconds: float) -> dict:
    return {"workload": {"name": name}, "precision": precision, "speedup": 2.0, "memory_ratio": 0.5,
            "preftune": {"seconds_per_step": seconds, "peak_rss_mb": 1000.0},
            "trl": {"seconds_per_step": 2 * seconds, "peak_rss_mb": 2000.0}}


def _machine(load: float) -> dict:
    return {"cpus": 2, "cpu_flags": ["avx2"], "threads_per_system": 2, "load_average_at_start": [load, 0, 0],
            "load_average_at_end": [load, 0, 0], "date": "2026-12-02 09:00 UTC"}


def test_a_merged_subset_replaces_its_rows_and_keeps_the_others():
    earlier = {"machine": _machine(0.1), "minutes": 90, "training": [_row("tiny-8k", "fp32", 2.0),
                                                                      _row("smollm2-lora", "bf16", 14.0)],
               "sampling": {"settings": "old"}, "peak": {"old": True}}
    new = {"machine": _machine(1.5), "minutes": 20, "training": [_row("smollm2-lora", "bf16", 12.0)],
           "peak": {"new": True}}
    out = run_all.merged(earlier, new, ["peak", "smollm2-lora"])
    assert [(r["workload"]["name"], r["preftune"]["seconds_per_step"]) for r in out["training"]] == [
        ("tiny-8k", 2.0), ("smollm2-lora", 12.0)]
    assert out["sampling"] == {"settings": "old"} and out["peak"] == {"new": True}
    out.pop("sampling"), out.pop("peak")  # the table's own lines for these are the full run's format
    assert out["machine"]["load_average_at_start"][0] == 0.1  # the full run's machine line stays
    assert out["partial_runs"] == [{"only": ["peak", "smollm2-lora"], "machine": new["machine"], "minutes": 20}]
    text = run_all.table(out)
    assert "| smollm2-lora | bf16 | 12.00 | 24.00 |" in text
    assert "Rerun since (2026-12-02 09:00 UTC, 20 min): peak, smollm2-lora, load average 1.5" in text


def test_the_flop_counter_counts_cpu_attention_by_the_pairs_it_computes():
    """PyTorch's FlopCounterMode has no formula for the CPU flash-attention kernels; the benchmarks' counter
    adds one. Batch 1, 2 heads, head dim 8, 4 queries and 4 keys: causal, 4 + 3 + 2 + 1 = 10 pairs, so the
    forward is 2 products x 2 FLOPs x 2 heads x 10 pairs x 8 = 640 and the backward 5 products, 1,600; a
    boolean mask letting 5 of the 16 pairs through: 320 forward; no mask and not causal: 16 pairs, 1,024."""
    import torch
    from common import flop_counter

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    mask[1, :2] = True
    mask[3, 2:4] = True
    counts = []
    for kwargs in ({"is_causal": True}, {"attn_mask": mask}, {}):
        with flop_counter() as counter:
            sdpa(q, k, v, **kwargs)
        counts.append(counter.get_total_flops())
    assert counts == [640, 320, 1024]
    with flop_counter() as counter:
        sdpa(q, k, v, is_causal=True).sum().backward()
    assert counter.get_total_flops() == 640 + 1600


def test_the_fraction_of_peak_is_taken_at_the_median_rate_of_the_repeats(monkeypatch):
    """Three repeats at 100, 300 and 200 tokens/s of 5e8 FLOPs each: the median, 200 tokens/s, is 100 GFLOP/s,
    25% of a 400 GFLOP/s bf16 peak (the kernels' dtype when the CPU has bf16 units). Without bf16 units the
    fp32 peak (160) is the one the kernels run at: 62.5%, and per repeat 50/160, 150/160 and 100/160."""
    import bench_peak

    run = {"runs": {"preftune": [{"flops_per_token": 5e8, "tokens_per_second": rate} for rate in (100, 300, 200)]}}
    for native, expected in ((True, 0.25), (False, 0.625)):
        monkeypatch.setattr(bench_peak, "run_worker",
                            lambda *a, native=native: {"fp32": 160.0, "bf16": 400.0, "native_bf16": native})
        out = bench_peak.fraction_of_peak(run, threads=2)
        assert abs(out["achieved_gflops"] - 100.0) < 1e-9 and abs(out["fraction_of_peak"] - expected) < 1e-12
        assert abs(out["fraction_of_bf16_peak"] - 0.25) < 1e-12
    assert [round(f, 4) for f in out["fraction_of_peak_per_repeat"]] == [0.3125, 0.9375, 0.625]
