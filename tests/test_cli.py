"""The command line: help, errors before any model loads, train / eval, Ctrl-C then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from preftune.cli import main


def write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for line in ("training.learning_rate = 5e-07", "objective.name = 'dpo'", "data.max_length = 1024",
                 "reference.precompute = False", "lora.r = 16", "objective.beta = 0.1", "objective.label_smoothing = 0.0",
                 "e.g. objective.beta=0.2"):
        assert line in out
    assert "params" not in out


@pytest.mark.parametrize(("command", "present", "absent"), [
    ("sft", ["objective.name = 'sft'", "objective.<parameter>"], ["objective.name = 'dpo'", "objective.beta"]),
    ("label", ["judge.type = one of function, reward_model, sequence_classifier, chat_model, http", "judge.path = ''",
               "judge.model.name_or_path = ''", "e.g. format=all_pairs"], ["judge = {}", "objective"]),
    ("generate", ["sampling.num_samples = 4", "e.g. sampling.num_samples=8"], ["objective"]),
    ("winrate", ["kl.reference = ''", "judge.type = one of"], ["objective"]),
])
def test_each_command_help_lists_its_own_keys(command, present, absent, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert all(p in out for p in present), [p for p in present if p not in out]
    assert not [a for a in absent if a in out]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == "preftune 0.1.0"


def test_bad_key_fails_before_any_model_loads(tmp_path, base_config, capsys, monkeypatch):
    import preftune.modeling as modeling

    monkeypatch.setattr(modeling, "load_policy", lambda *a: pytest.fail("a model was loaded"))
    path = write_config(tmp_path, base_config)
    assert main(["train", str(path), "training.learnin_rate=1"]) == 2
    assert "unknown config key 'training.learnin_rate' (did you mean 'training.learning_rate'?)" in capsys.readouterr().err


def test_bad_data_fails_before_any_model_loads(tmp_path, base_config, capsys, monkeypatch):
    import preftune.modeling as modeling

    monkeypatch.setattr(modeling, "load_tokenizer", lambda *a: pytest.fail("the tokenizer was loaded"))
    monkeypatch.setattr(modeling, "load_policy", lambda *a: pytest.fail("a model was loaded"))
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}) + "\n")
    base_config["data"].update(train_file=str(data), eval_fraction=0.0)
    assert main(["train", str(write_config(tmp_path, base_config))]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "bad.jsonl:2" in err and "'chosen'" in err


def test_sft_checks_the_recipe_as_written_then_with_its_own_objective(tmp_path, base_config, capsys, monkeypatch):
    """`preftune sft` on a DPO recipe: a parameter DPO does not take is the recipe's error, not silently dropped;
    a modifier that needs a rejected completion (WPO) is an error for SFT, before any model loads."""
    import preftune.modeling as modeling

    monkeypatch.setattr(modeling, "load_policy", lambda *a: pytest.fail("a model was loaded"))
    path = write_config(tmp_path, base_config)
    assert main(["sft", str(path), "objective.gamma=1"]) == 2
    assert "objective 'dpo' does not take parameter(s) gamma" in capsys.readouterr().err
    assert main(["sft", str(path), "objective.wpo=true"]) == 2
    err = capsys.readouterr().err
    assert "with objective 'sft' instead of the recipe's 'dpo'" in err and "'sft' does not compare two completions" in err


def test_train_then_eval_the_final_model(tmp_path, base_config, capsys):
    path = write_config(tmp_path, base_config)
    assert main(["train", str(path), "training.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "held-out metrics after training:" in out and "eval/rewards/accuracies" in out
    final = Path(base_config["training"]["output_dir"]) / "final"
    assert main(["eval", str(path), f"model.name_or_path={final}",
                 f"reference.name_or_path={base_config['model']['name_or_path']}",
                 f"training.output_dir={tmp_path / 'eval'}"]) == 0
    assert f"written to {tmp_path / 'eval'}/eval-" in capsys.readouterr().out
    written = sorted((tmp_path / "eval").glob("eval-*.json"))
    assert [p.name for p in written] == [f"eval-{str(tmp_path / 'run' / 'final').strip('/').replace('/', '-')}.json"]
    metrics = json.loads(written[0].read_text())
    history = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    after = [row for row in history if "eval/loss" in row][-1]
    # the same held-out split, model and reference: the eval command reproduces the trainer's last eval
    assert metrics["eval/loss"] == pytest.approx(after["eval/loss"], abs=1e-5)
    assert metrics["eval/rewards/margins"] == pytest.approx(after["eval/rewards/margins"], abs=1e-5)
    assert metrics["eval/examples"] == 6


def test_ctrl_c_writes_a_checkpoint_and_the_rerun_resumes(tmp_path, base_config):
    """SIGINT mid-run: the process exits 130 after checkpointing; the same command finishes the run."""
    base_config["training"].update(max_steps=400, save_steps=None, logging_steps=1, lr_scheduler="constant")
    path = write_config(tmp_path, base_config)
    cmd = [sys.executable, "-m", "preftune.cli", "train", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = Path(base_config["training"]["output_dir"]) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    assert len(metrics.read_text().splitlines()) >= 4, "training did not start within 300 s"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    checkpoints = sorted((metrics.parent / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    stopped_at = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < 400 and f"interrupted at step {stopped_at}" in out
    # finish a shorter run from the same checkpoint (the constant schedule does not depend on max_steps)
    end = stopped_at + 3
    done = subprocess.run(cmd + [f"training.max_steps={end}"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == list(range(1, end + 1))
    assert f"resumed from {checkpoints[0]} at step {stopped_at}" in done.stderr


@pytest.mark.parametrize("command", sorted(__import__("preftune.cli", fromlist=["COMMANDS"]).COMMANDS))
def test_every_command_help_lists_its_config_keys(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "config keys (section.key = default)" in out and " = " in out.split("config keys", 1)[1]


ENDS_GROUP = """import sys
import torch.distributed as dist
from preftune import cli
dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
cli.main = lambda: int(sys.argv[2])  # the command's exit code
code = cli.run()
print(code, dist.is_initialized())
"""


@pytest.mark.parametrize(("code", "still_initialized"), [(0, False), (2, True)])
def test_the_entry_point_ends_the_process_group_after_a_command_that_succeeded(tmp_path, code, still_initialized):
    """A real gloo group (one process, file rendezvous): ``run`` ends it after exit code 0 (left to interpreter
    shutdown, gloo's threads can abort a finished job), not after a failure (another process may still be in a
    collective)."""
    script = tmp_path / "ends_group.py"
    script.write_text(ENDS_GROUP)
    done = subprocess.run([sys.executable, str(script), f"file://{tmp_path / 'rendezvous'}", str(code)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(code), str(still_initialized)]
