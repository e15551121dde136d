"""Model folders are data: a folder that ships its own modelling code (``auto_map`` in config.json) is
refused unless the config sets trust_remote_code, with one line naming the key; with it, the code runs
and the model card says so. The folder is built here from the tiny Llama: a config whose model type
transformers does not know, mapped to a module that leaves a marker file when it is imported."""

from __future__ import annotations

import copy
import json
import shutil
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from preftune.cli import main
from preftune.config import ConfigError, config_from_dict
from preftune.feedback.judges import build_judge
from preftune.reward.model import RewardBackboneConfig, RewardModel
from preftune.training import train

CUSTOM_MODULE = '''
from pathlib import Path

Path({marker!r}).write_text("custom code ran")

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel


class CustomConfig(LlamaConfig):
    model_type = "preftune_custom"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig


class CustomModel(LlamaModel):
    config_class = CustomConfig
'''


@pytest.fixture
def custom_code_dir(tiny_model_dir, tmp_path, monkeypatch):
    """(folder, marker): the tiny Llama re-declared as a custom architecture, plus the files of a reward
    model folder, so that every loader can be pointed at it."""
    import transformers.dynamic_module_utils as dynamic

    # transformers copies trusted modules into its modules cache and puts that on sys.path: keep both in tmp
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = shutil.copytree(tiny_model_dir, tmp_path / "custom-model")
    marker = tmp_path / "custom-code-ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="preftune_custom", architectures=["CustomForCausalLM"], auto_map={
        "AutoConfig": "custom_model.CustomConfig", "AutoModel": "custom_model.CustomModel",
        "AutoModelForCausalLM": "custom_model.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_model.py").write_text(CUSTOM_MODULE.format(marker=str(marker)))
    (folder / "reward_model.json").write_text(json.dumps({
        "kind": "decoder", "pooling": "last", "normalize": False, "include_prompt": True, "max_length": 64,
        "chat_template": None, "backbone": "custom"}))
    width = config["hidden_size"]
    save_file({"weight": torch.zeros(1, width), "bias": torch.zeros(1)}, str(folder / "reward_head.safetensors"))
    return folder, marker


def one_line(exc: BaseException) -> str:
    assert "\n" not in str(exc)
    return str(exc)


def test_a_folder_with_its_own_code_is_refused_by_every_loader(custom_code_dir, base_config, tmp_path, capsys):
    folder, marker = custom_code_dir
    raw = copy.deepcopy(base_config)
    raw["model"]["name_or_path"] = str(folder)
    with pytest.raises(ConfigError, match="config key 'model.trust_remote_code': .* ships its own modelling code") as info:
        train(config_from_dict(copy.deepcopy(raw), []))
    assert "model.trust_remote_code: true" in one_line(info.value)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "preftune: config error: config key 'model.trust_remote_code'")

    with pytest.raises(ConfigError, match="config key 'model.trust_remote_code'") as info:
        RewardModel.from_backbone(RewardBackboneConfig(name_or_path=str(folder)), None, seed=0)
    one_line(info.value)
    with pytest.raises(ConfigError, match="config key 'judge.trust_remote_code'") as info:
        build_judge({"type": "reward_model", "path": str(folder)})
    one_line(info.value)
    with pytest.raises(ConfigError, match="config key 'judge.model.trust_remote_code'"):
        build_judge({"type": "chat_model", "model": {"name_or_path": str(folder)}})
    assert not marker.exists()


def test_trust_remote_code_runs_the_folder_code_and_the_model_card_says_so(custom_code_dir, base_config):
    folder, marker = custom_code_dir
    raw = copy.deepcopy(base_config)
    raw["model"].update(name_or_path=str(folder), trust_remote_code=True)
    raw["training"].update(max_steps=1, save_steps=1)
    result = train(config_from_dict(raw, []))
    assert marker.exists()  # the refusals above were about code that really runs
    card = (result.final_dir / "README.md").read_text()
    assert f"Loaded with `model.trust_remote_code: true`: Python modules shipped in `{folder}`" in card
    assert RewardModel.load(folder, trust_remote_code=True).head.weight.shape == (1, 64)



def test_a_wrong_model_path_is_one_line_and_a_run_folder_points_at_its_final(tmp_path, base_config, capsys):
    import yaml

    from preftune.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_config))
    assert main(["train", str(path), f"model.name_or_path={tmp_path / 'no_such_model'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"preftune: error: model {tmp_path / 'no_such_model'}: no such folder (looked for {tmp_path / 'no_such_model'})"
    run_dir = tmp_path / "runs" / "sft"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}")
    assert main(["train", str(path), f"model.name_or_path={run_dir}"]) == 2
    assert f"{run_dir} is a preftune run folder, not a model: its trained model is {run_dir / 'final'}" in \
        capsys.readouterr().err
    assert main(["train", str(path), "model.name_or_path=nobody/no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune: error: model nobody/no-such-model: not a local folder, and the Hugging Face "
                          "hub is offline (HF_HUB_OFFLINE=1)") and len(err.splitlines()) == 1
