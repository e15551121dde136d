"""Typed config: every recipe loads; unknown keys and bad values fail with the key's name."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from preftune.config import ConfigError, config_from_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
# every recipe, those in sub-folders too (configs/zephyr/ is one recipe's chain and its GPU preset)
# every preftune recipe, in sub-folders too; configs/accelerate/ holds accelerate's own launch configs
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if "accelerate" not in p.relative_to(ROOT).parts)


def test_there_is_a_recipe_for_every_objective_and_modifier():
    from preftune.objectives import OBJECTIVES

    names = {p.stem for p in CONFIGS}
    assert set(OBJECTIVES) <= names, sorted(set(OBJECTIVES) - names)
    assert {"cdpo", "rpo", "preferred_ft", "ld_dpo", "wpo", "mpo", "sdpo", "trdpo"} <= names


def recipe_command(path: Path) -> str:
    """Every recipe says how to run it on its second line: `# Run:  preftune COMMAND configs/x.yaml`."""
    run_line = path.read_text().splitlines()[1]
    assert run_line.startswith("# Run:  preftune "), f"{path.name}: second line must be '# Run:  preftune ...'"
    return run_line.split()[3]


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT).with_suffix("")) for p in CONFIGS])
def test_every_recipe_loads_with_its_command(path):
    command = recipe_command(path)
    if command in ("train", "sft", "eval"):
        config = load_config(path)
        assert Path(config.data.train_file).is_file(), config.data.train_file
        assert config.training.output_dir.startswith("runs/")
    else:  # commands with their own sections load through their module's loader
        from preftune.cli import COMMANDS

        module = importlib.import_module(COMMANDS[command].handler.partition(":")[0])
        getattr(module, f"load_{command.replace('-', '_')}_config")(path)


def test_overrides_are_typed_and_reach_objective_parameters():
    config = config_from_dict({}, ["objective.beta=0.25", "training.learning_rate=1e-5", "lora.enabled=true",
                                   "lora.target_modules=[q_proj]", "data.max_length=null"])
    assert config.objective.params == {"beta": 0.25}
    assert config.training.learning_rate == 1e-5
    assert config.lora.enabled is True and config.lora.target_modules == ["q_proj"]
    assert config.data.max_length is None


@pytest.mark.parametrize(
    ("raw", "overrides", "message"),
    [
        ({"training": {"batchsize": 2}}, [], r"unknown config key 'training.batchsize' \(did you mean 'training.batch_size'\?\)"),
        ({"trainer": {}}, [], r"unknown config key 'trainer' \(did you mean 'training'\?\)"),
        ({}, ["training.batch_size=two"], r"'training.batch_size': expected an integer, got 'two'"),
        ({}, ["training.precision=fp8"], r"'training.precision': expected one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
        ({}, ["training.batch_size=0"], r"'training.batch_size': must be > 0"),
        ({}, ["objective.name=dpx"], r"unknown objective 'dpx' \(did you mean 'dpo'\?\); valid objectives: .*simpo"),
        ({}, ["objective.name=dop"], r"unknown objective 'dop' \(did you mean 'dpo' or 'dpop'\?\)"),
        ({}, ["objective.gamma=1"], r"objective 'dpo' does not take parameter\(s\) gamma; its parameters are: beta"),
        ({}, ["objective.beta=-1"], r"beta must be > 0"),
        ({}, ["data.max_prompt_length=600", "data.max_length=512"], r"'data.max_prompt_length' \(600\) must be smaller"),
        ({}, ["training.lr"], r"override 'training.lr' is not of the form dotted.key=value"),
        ({"data": {"eval_file": "x.jsonl", "eval_fraction": 0.1}}, [], r"either 'data.eval_file' or 'data.eval_fraction'"),
        ({}, ["lora.target_modules=[q_proj, 7]"], r"'lora.target_modules\[1\]': expected a string, got 7"),
        ({"data": {"columns": {"prompt": 3}}}, [], r"'data.columns.prompt': expected a string, got 3"),
        ({"training": 3}, [], r"config key 'training': expected a mapping, got 3"),
        ({}, ["training.batch_size=true"], r"'training.batch_size': expected an integer, got True"),
        ({}, ["lora.enabled=1"], r"'lora.enabled': expected true or false, got 1"),
        ({}, ["training.stages=abc"], r"'training.stages': expected an integer or a list of a string or null, got 'abc'"),
    ],
)
def test_bad_config_names_the_key_and_what_is_allowed(raw, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, overrides)


def test_default_prompt_limit_leaves_room_for_completions():
    """max_length = 96 with max_prompt_length left at its default (512): the prompt limit becomes 96 // 2 = 48;
    an explicit conflicting value stays an error."""
    assert config_from_dict({"data": {"max_length": 96}}).data.max_prompt_length == 48
    assert config_from_dict({"data": {"max_length": 2048}}).data.max_prompt_length == 512
    with pytest.raises(ConfigError, match="max_prompt_length"):
        config_from_dict({"data": {"max_length": 96, "max_prompt_length": 100}})


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  learning_rate: fast\n")
    with pytest.raises(ConfigError, match=rf"{path}: config key 'training.learning_rate': expected a number"):
        load_config(path)


def test_saved_config_round_trips(tmp_path):
    config = config_from_dict({"objective": {"name": "simpo", "gamma": 0.5}}, ["training.seed=7"])
    save_config(config, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == config


def test_every_bad_key_is_reported_at_once_and_exponents_read_as_numbers(tmp_path):
    """Two unknown keys in one section: both named. YAML 1.1 reads `1e-5` as a string; recipes mean 1e-05."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"training": {"batch_sise": 1, "learnin_rate": 2}})
    assert "'training.batch_sise' (did you mean 'training.batch_size'?)" in str(info.value)
    assert "'training.learnin_rate' (did you mean 'training.learning_rate'?)" in str(info.value)
    path = tmp_path / "r.yaml"
    path.write_text("training:\n  learning_rate: 1e-5\n  weight_decay: 2E+1\n")
    config = load_config(path, ["training.adam_epsilon=3e-9"])
    assert (config.training.learning_rate, config.training.weight_decay, config.training.adam_epsilon) == (1e-5, 20.0, 3e-9)
