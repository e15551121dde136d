"""`generate`, `label` and `winrate` on 2 real processes (torchrun, gloo on CPU) write byte for byte the
files 1 process writes: 7 prompts in batches of 3 (rounds of 2 batches, the last one uneven), judge chunks
of 2, KL batches of 3, and the 2-process generation resumed from a file holding 1 batch plus a partial line.
Both sides run with one thread per process (different thread counts may sum floats in another order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from preftune.cli import main

JUDGE = "def count_e(completion):\n    return float(completion.count('e'))\n"
DRIVER = """import sys
import torch.distributed as dist
from preftune.cli import main
for command in ("generate", "label", "winrate"):
    if main([command, command + ".yaml"]) != 0:
        sys.exit(f"preftune {command} failed")
dist.destroy_process_group()  # what the preftune command does after it succeeded (see cli.run)
"""


def write_recipes(folder: Path, model: Path, reference: Path, judge: Path) -> None:
    """Relative file names only: the outputs of both folders can then be compared byte for byte."""
    folder.mkdir()
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"The film number {i} was"}) + "\n"
                                                   for i in range(7)))
    judge_section = {"type": "function", "function": f"{judge}:count_e"}
    recipes = {
        "generate": {"model": {"name_or_path": str(model)}, "prompts": {"file": "prompts.jsonl", "chat_template": False},
                     "sampling": {"num_samples": 2, "max_new_tokens": 6, "temperature": 1.0, "seed": 5},
                     "batch_size": 3, "output_file": "generations.jsonl", "progress_bar": False, "backend": "hf"},
        "label": {"input_file": "generations.jsonl", "output_file": "pairs.jsonl", "format": "all_pairs",
                  "chunk_size": 2, "judge": judge_section, "progress_bar": False},
        "winrate": {"model_file": "generations.jsonl", "baseline_file": "baseline.jsonl", "judge": judge_section,
                    "kl": {"reference": str(reference), "batch_size": 3}, "chunk_size": 2,
                    "output_file": "winrate.json", "progress_bar": False},
    }
    for name, values in recipes.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(values))


def test_two_processes_write_the_files_one_process_writes(tiny_model_dir, other_model_dir, tmp_path, monkeypatch):
    judge = tmp_path / "judge.py"
    judge.write_text(JUDGE)
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        write_recipes(folder, tiny_model_dir, other_model_dir, judge)
    # the baseline: the other model's samples of the same prompts (generated once, copied to both folders)
    baseline = yaml.safe_load((one / "generate.yaml").read_text())
    baseline.update(model={"name_or_path": str(other_model_dir)}, output_file="baseline.jsonl")
    (one / "baseline.yaml").write_text(yaml.safe_dump(baseline))
    threads = torch.get_num_threads()
    monkeypatch.chdir(one)
    try:
        torch.set_num_threads(1)
        assert main(["generate", "baseline.yaml"]) == 0
        for command in ("generate", "label", "winrate"):
            assert main([command, f"{command}.yaml"]) == 0
    finally:
        torch.set_num_threads(threads)
    (two / "baseline.jsonl").write_bytes((one / "baseline.jsonl").read_bytes())
    first_batch = (one / "generations.jsonl").read_text().splitlines(keepends=True)[:3]
    (two / "generations.jsonl").write_text("".join(first_batch) + '{"index": 3, "prom')  # a crash mid-write

    (two / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "driver.py"], cwd=two, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    for name in ("generations.jsonl", "pairs.jsonl", "pairs.summary.json", "winrate.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    report = json.loads((one / "winrate.json").read_text())
    assert report["kl"]["samples"] == 14 and report["prompts"] == 7
    assert report["judge"]["judged"] == 28  # 14 samples of each file scored once, summed over the processes
    assert len((one / "generations.jsonl").read_text().splitlines()) == 7
    assert done.stdout.count("7 prompts (4 generated now, 3 already there)") == 1  # printed by the main process
