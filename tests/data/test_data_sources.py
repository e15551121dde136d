"""Datasets by name, offline: hub datasets read from a local datasets cache (written here with datasets' own
builder, as load_dataset leaves a download), any split name, subsets, folders of data files with data_dir."""

from __future__ import annotations

import json

import pytest

from preftune.config import ConfigError, DataConfig, config_from_dict
from preftune.data import DataValidationError, PairExample, load_examples
from preftune.testing import cache_hub_dataset

datasets = pytest.importorskip("datasets")


def ultrafeedback_row(i: int, good: str = "good", bad: str = "bad") -> dict:
    """HuggingFaceH4/ultrafeedback_binarized's columns: a text prompt beside full conversations."""
    prompt = f"question {i}"
    return {"prompt": prompt, "prompt_id": str(i), "score_chosen": 8.0, "score_rejected": 3.0,
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{good} {i}"}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{bad} {i}"}]}


def expected_pair(source: str, i: int) -> PairExample:
    return PairExample(source, [{"role": "user", "content": f"question {i}"}],
                       [{"role": "assistant", "content": f"good {i}"}], [{"role": "assistant", "content": f"bad {i}"}])


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty datasets cache, with the hub unreachable (HF_HUB_OFFLINE=1 from conftest)."""
    assert datasets.config.HF_HUB_OFFLINE, "these tests must not be able to reach the hub"
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hub_dataset_by_name_with_any_split_names_offline(hub_cache):
    cache_hub_dataset("TinyOrg/ultrafeedback_tiny", {
        "train_prefs": [ultrafeedback_row(i) for i in range(3)], "test_prefs": [ultrafeedback_row(9)],
        "train_gen": [ultrafeedback_row(5)]}, hub_cache)
    config = DataConfig(train_file="TinyOrg/ultrafeedback_tiny", split="train_prefs", eval_split="test_prefs")
    splits = load_examples(config, "pairs")
    name = "TinyOrg/ultrafeedback_tiny"
    assert splits.train == [expected_pair(f"{name}[train_prefs]:row {i}", i) for i in range(3)]
    assert splits.eval == [expected_pair(f"{name}[test_prefs]:row 0", 9)]
    streamed = load_examples(DataConfig(train_file=name, split="train_prefs", eval_split="test_prefs",
                                        streaming=True), "pairs")
    assert list(streamed.train) == splits.train and list(streamed.eval) == splits.eval
    # a slice of a split, as datasets writes it
    sliced = load_examples(DataConfig(train_file=name, split="train_prefs[1:]"), "pairs")
    assert [e.source for e in sliced.train] == [f"{name}[train_prefs[1:]]:row 0", f"{name}[train_prefs[1:]]:row 1"]


def test_hub_rows_that_fail_validation_are_named_by_dataset_split_and_row(hub_cache):
    rows = [ultrafeedback_row(0), ultrafeedback_row(1, good="same", bad="same"), ultrafeedback_row(2)]
    cache_hub_dataset("TinyOrg/prefs", {"train": rows}, hub_cache)
    with pytest.raises(DataValidationError) as caught:
        load_examples(DataConfig(train_file="TinyOrg/prefs"), "pairs")
    assert "1 of 3 rows are invalid" in str(caught.value)
    assert "TinyOrg/prefs[train]:row 1: fields 'chosen' and 'rejected' are identical" in str(caught.value)


def test_a_dataset_that_is_not_cached_says_in_one_line_how_to_fetch_it(hub_cache):
    with pytest.raises(DataValidationError) as caught:
        load_examples(DataConfig(train_file="TinyOrg/never_downloaded", subset="en"), "pairs")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("data.train_file: 'TinyOrg/never_downloaded' is not a local file or folder, and the "
                              f"datasets cache ({hub_cache}) does not hold it (HF_HUB_OFFLINE=1)")
    assert message.endswith("""python -c "import datasets; datasets.load_dataset('TinyOrg/never_downloaded', 'en')\"""")


def test_split_choice_and_subsets(hub_cache):
    cache_hub_dataset("TinyOrg/two", {"train_prefs": [ultrafeedback_row(0)]}, hub_cache, subset="default")
    cache_hub_dataset("TinyOrg/two", {"train": [ultrafeedback_row(5)]}, hub_cache, subset="small")
    small = load_examples(DataConfig(train_file="TinyOrg/two", subset="small"), "pairs")
    assert small.train == [expected_pair("TinyOrg/two[train]:row 0", 5)]
    with pytest.raises(DataValidationError, match=r"TinyOrg/two: a DatasetDict without a 'train' split; its splits "
                                                  r"are 'train_prefs'; set data.split to one of them"):
        load_examples(DataConfig(train_file="TinyOrg/two", subset="default"), "pairs")
    with pytest.raises(DataValidationError, match=r"^data.train_file: 'TinyOrg/two' \(split 'nope', subset "
                                                  r"'default'\): Unknown split \"nope\". Should be one of \['train_prefs'\]"):
        load_examples(DataConfig(train_file="TinyOrg/two", subset="default", split="nope"), "pairs")


def test_folder_of_data_files_with_data_dir_and_split_names(tmp_path, hub_cache):
    """A downloaded hub repository (hf download --local-dir) is a folder of files; datasets finds the splits
    from the file names, data.data_dir picks the sub-folder."""
    folder = tmp_path / "repo" / "en"
    folder.mkdir(parents=True)
    for split, ids in (("train", [0, 1]), ("test", [7])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(ultrafeedback_row(i)) + "\n" for i in ids),
                                               encoding="utf-8")
    config = DataConfig(train_file=str(tmp_path / "repo"), data_dir="en", eval_split="test")
    splits = load_examples(config, "pairs")
    assert splits.train == [expected_pair(f"repo[train]:row {i}", i) for i in range(2)]
    assert splits.eval == [expected_pair("repo[test]:row 0", 7)]


def test_split_options_on_a_single_file_and_in_the_config(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"pairs.jsonl: a single file has no split; data.split"):
        load_examples(DataConfig(train_file=str(path), split="train_prefs"), "pairs")
    with pytest.raises(ConfigError, match=r"give either 'data.eval_split' or 'data.eval_fraction', not both"):
        config_from_dict({"data": {"train_file": "x", "eval_split": "test", "eval_fraction": 0.1}})
