"""The accelerate config files under configs/accelerate/ (not recipes: tests/test_config.py globs only the top
folder): each loads in accelerate's own config reader with the set-up its name says, and says in comments
when to use it and how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

FOLDER = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {
    "ddp.yaml": (DistributedType.MULTI_GPU, None),
    "fsdp.yaml": (DistributedType.FSDP, ("fsdp_config", "fsdp_reshard_after_forward", True)),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, ("deepspeed_config", "zero_stage", 2)),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, ("deepspeed_config", "zero_stage", 3)),
}


def test_every_shipped_file_is_checked():
    assert sorted(p.name for p in FOLDER.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_in_accelerate(name):
    kind, setting = EXPECTED[name]
    config = load_config_from_file(str(FOLDER / name))
    assert config.distributed_type == kind
    if setting:
        section, key, value = setting
        assert getattr(config, section)[key] == value
    text = (FOLDER / name).read_text(encoding="utf-8")
    assert f"# Run:  accelerate launch --config_file configs/accelerate/{name}" in text
    assert "# When:" in text
