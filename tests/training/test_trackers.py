"""training.report_to: every tracker (TensorBoard, and wandb offline, an mlflow file store and trackio's local
database when installed) receives the metrics.jsonl names and values at their steps, and the sample
generations; samples.jsonl holds the model's greedy completions (checked against a hand-written greedy loop)."""

from __future__ import annotations

import copy
import glob
import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.config import ConfigError, DataConfig, config_from_dict
from preftune.data import load_examples, tokenize_examples
from preftune.testing import tiny_tokenizer
from preftune.training import train

OPTIONAL = [name for name in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(name)]


def expected_values(run_dir: Path) -> dict[tuple[str, int], float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(key, row["step"]): value for row in rows for key, value in row.items() if key != "step"}


def tensorboard_values(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "preftune"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    values = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")}
    return values, texts


def wandb_values(run_dir: Path) -> dict[tuple[str, int], object]:
    """The offline run file is a LevelDB-style log (32 KiB blocks; records of crc32, length, type, data after
    a 7-byte file header) of protobuf ``Record``s: read the history records back (a table is logged as
    ``samples/<field>`` items)."""
    from wandb.proto import wandb_internal_pb2

    raw = Path(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))[0]).read_bytes()
    position, pieces, values = 7, [], {}
    while position + 7 <= len(raw):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        pieces.append(raw[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                values.update({(k, items["_step"]): v for k, v in items.items() if not k.startswith("_")})
    return values


def mlflow_values(tracking_uri: str, keys) -> tuple[dict[tuple[str, int], float], dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "preftune"]
    [run] = client.search_runs([experiment.experiment_id])
    values = {(key, m.step): m.value for key in keys for m in client.get_metric_history(run.info.run_id, key)}
    return values, run


def trackio_values(run_name: str) -> dict[tuple[str, int], float]:
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("preftune", run_name)
    return {(k, row["step"]): v for row in logs for k, v in row.items() if isinstance(v, (int, float))
            and k not in ("step", "timestamp") and not k.startswith("system/")}


def greedy(model, prompt_ids: list[int], new_tokens: int, eos: int) -> list[int]:
    """Second implementation of greedy decoding: argmax of the last position's logits, one token at a time."""
    ids = list(prompt_ids)
    for _ in range(new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token == eos:
            break
    return ids[len(prompt_ids):]


def test_trackers_get_the_metrics_jsonl_names_and_the_samples(base_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants a database unless told otherwise
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    raw = copy.deepcopy(base_config)
    raw["training"].update(report_to=["tensorboard", *OPTIONAL], tracker_kwargs={"wandb": {"mode": "offline"}},
                           eval_steps=2, sample_prompts=2, sample_max_new_tokens=5)
    result = train(config_from_dict(raw))
    run_dir = result.run_dir
    expected = expected_values(run_dir)
    assert {key for key, _ in expected} >= {"loss", "rewards/chosen", "rewards/margins", "logps/chosen", "lr",
                                            "grad_norm", "epoch", "eval/loss", "eval/rewards/accuracies"}

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["split"]) for s in samples] == [(0, "eval"), (0, "eval"), (2, "eval"), (2, "eval"),
                                                          (3, "eval"), (3, "eval")]
    config = config_from_dict(raw)
    tokenizer = tiny_tokenizer()
    held_out = load_examples(config.data, "pairs", seed=config.training.seed).eval[:2]
    prompts, _ = tokenize_examples(held_out, tokenizer, config.data)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()  # the weights of the last evaluation
    for sample, prompt in zip(samples[-2:], prompts, strict=True):
        assert sample["index"] == prompt.index and sample["prompt"] == tokenizer.decode(prompt.prompt_ids)
        new = greedy(final, prompt.prompt_ids, 5, tokenizer.eos_token_id)
        assert sample["completion"] == tokenizer.decode(new, skip_special_tokens=True)

    scalars, texts = tensorboard_values(run_dir)
    assert scalars.keys() == expected.keys()
    assert scalars == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32
    assert sorted(texts) == [0, 2, 3] and samples[-1]["completion"].replace("|", "\\|") in texts[3]
    if "wandb" in OPTIONAL:
        logged = wandb_values(run_dir)
        assert {k: v for k, v in logged.items() if not k[0].startswith("samples/")} == pytest.approx(expected)
        assert {step: logged[("samples/nrows", step)] for step in (0, 2, 3)} == {0: 2, 2: 2, 3: 2}
        assert logged[("samples/_type", 3)] == "table-file"
    if "mlflow" in OPTIONAL:
        values, run = mlflow_values((tmp_path / "mlruns").as_uri(), {key for key, _ in expected})
        assert values == pytest.approx(expected)
        assert run.data.params["objective.beta"] == "0.1" and run.data.params["training.sample_prompts"] == "2"
        from mlflow.tracking import MlflowClient

        path = MlflowClient((tmp_path / "mlruns").as_uri()).download_artifacts(
            run.info.run_id, "samples/step-00000003.jsonl", str(tmp_path))
        assert [json.loads(line) for line in Path(path).read_text().splitlines()] == \
            [{k: v for k, v in s.items() if k != "step"} for s in samples[-2:]]
    if "trackio" in OPTIONAL:
        assert trackio_values(run_dir.name) == pytest.approx(expected)


def test_tracker_settings_are_checked(base_config, monkeypatch):
    raw = copy.deepcopy(base_config)
    raw["training"]["report_to"] = ["tensorboard", "comet"]
    with pytest.raises(ConfigError, match=r"'training.report_to\[1\]': expected one of 'tensorboard', 'wandb', "
                                          r"'mlflow', 'trackio', got 'comet'"):
        config_from_dict(raw)
    raw["training"]["report_to"] = ["wandb"]
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"'training.report_to': wandb is not installed; pip install wandb"):
        train(config_from_dict(raw))


def test_samples_are_off_by_default(base_config):
    config = config_from_dict(copy.deepcopy(base_config))
    assert config.training.sample_prompts == 0 and config.training.report_to == ["tensorboard"]
    assert DataConfig().streaming is False
