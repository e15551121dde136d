"""The arithmetic of each on-policy method, by hand: SPPO's P̂ and loss, DNO's margin filter, SPO's win-rate
rewards and leave-one-out baseline, RSO's acceptance probabilities and the distribution its sampler draws."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from preftune import preference_loss
from preftune.feedback.judges import build_judge
from preftune.objectives.base import GroupLogps
from preftune.objectives.spo import SPOParams, leave_one_out_advantages, self_play_rewards, spo_loss
from preftune.onpolicy.preferences import win_matrices, win_rates
from preftune.onpolicy.rso import acceptance_probabilities, rejection_sample, tournament_pairs
from preftune.onpolicy.selection import dno_rows, iterative_rows, sppo_rows


def length_judge():
    return build_judge({"type": "function", "function": "builtins:len"})


def test_win_rates_by_hand_from_a_pointwise_judge():
    """Scores (lengths) 1, 3, 3, 2: P[i][j] is 1/½/0. P̂(a) = (0+0+0)/3 = 0; P̂(bbb) = (1+½+1)/3 = 5/6, the same
    for ccc; P̂(dd) = (1+0+0)/3 = 1/3. With Bradley–Terry probabilities P̂(a) = (σ(-2)+σ(-2)+σ(-1))/3."""
    texts = ["a", "bbb", "ccc", "dd"]
    (matrix,), scores = win_matrices(length_judge(), ["x"], [texts])
    assert scores == [[1.0, 3.0, 3.0, 2.0]]
    assert win_rates(matrix) == pytest.approx([0.0, 5 / 6, 5 / 6, 1 / 3])
    (soft,), _ = win_matrices(length_judge(), ["x"], [texts], pointwise_as="bradley_terry")
    sigma = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert win_rates(soft)[0] == pytest.approx((sigma(-2) + sigma(-2) + sigma(-1)) / 3)
    assert soft[1][2] == 0.5 and soft[3][0] == pytest.approx(sigma(1))


def test_sppo_rows_and_loss_by_hand():
    """P̂ = 0, 5/6, 5/6, 1/3 (above). winner_loser keeps the first highest (bbb, 5/6) and the lowest (a, 0).
    With β = 0.5 (η = 2) the targets are η(P̂ - ½) = 2/3 and -1; log-ratios h = 0.2 and -0.5 give losses
    (0.2 - 2/3)² = 0.217778 and (-0.5 + 1)² = 0.25."""
    texts, rates = ["a", "bbb", "ccc", "dd"], [0.0, 5 / 6, 5 / 6, 1 / 3]
    rows = sppo_rows("x", texts, rates, "winner_loser", Counter())
    assert [(r["completion"], r["score"]) for r in rows] == [("bbb", 5 / 6), ("a", 0.0)]
    assert len(sppo_rows("x", texts, rates, "all", Counter())) == 4
    out = preference_loss("sppo", policy_logps=torch.tensor([[-1.8], [-3.5]]), reference_logps=torch.tensor([[-2.0], [-3.0]]),
                          tokens=torch.ones(2, 1), mask=torch.ones(2, 1, dtype=torch.bool),
                          scores=torch.tensor([[5 / 6], [0.0]]), beta=0.5)
    assert out.losses.tolist() == pytest.approx([(0.2 - 2 / 3) ** 2, 0.25], abs=1e-6)
    assert out.chosen_rewards[0].item() == pytest.approx(0.1) and math.isnan(out.chosen_rewards[1].item())
    assert out.rejected_rewards[1].item() == pytest.approx(-0.25)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        preference_loss("sppo", policy_logps=torch.zeros(1, 1), reference_logps=torch.zeros(1, 1), tokens=torch.ones(1, 1),
                        mask=torch.ones(1, 1, dtype=torch.bool), scores=torch.tensor([[1.5]]))


def test_sppo_with_hard_probabilities_is_sppo_hard():
    """P̂ = 1 for chosen and 0 for rejected as two scored rows: the mean of the two rows' losses is half of
    sppo_hard's per-pair loss (which sums the two squares)."""
    pc, pr, rc, rr = torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-5.5])
    hard = preference_loss("sppo_hard", policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                           reference_rejected_logps=rr, chosen_tokens=torch.ones(1), rejected_tokens=torch.ones(1), beta=0.2)
    soft = preference_loss("sppo", policy_logps=torch.stack([pc, pr]), reference_logps=torch.stack([rc, rr]),
                           tokens=torch.ones(2, 1), mask=torch.ones(2, 1, dtype=torch.bool),
                           scores=torch.tensor([[1.0], [0.0]]), beta=0.2)
    assert soft.losses.mean().item() == pytest.approx(hard.losses.item() / 2)


def test_dno_keeps_only_pairs_above_the_win_rate_margin():
    """Win rates 0.9, 0.2, 0.5: best 0.9 vs worst 0.2, margin 0.7 — kept at min_margin 0.6 and 0.7, dropped (and
    counted) at 0.75. Blank samples never become a row."""
    texts, rates = ["good", "bad", "fine"], [0.9, 0.2, 0.5]
    for margin in (0.6, 0.7):
        (row,) = dno_rows("x", texts, rates, margin, Counter())
        assert (row["chosen"], row["rejected"]) == ("good", "bad")
        assert (row["score_chosen"], row["score_rejected"]) == (0.9, 0.2)
    counts = Counter()
    assert dno_rows("x", texts, rates, 0.75, counts) == [] and counts["below_margin"] == 1
    assert dno_rows("x", ["  ", "bad", "fine"], [1.0, 0.2, 0.5], 0.1, Counter())[0]["chosen"] == "fine"


def test_iterative_pairs_best_vs_worst_and_all_pairs():
    """Rates 0.5, 1.0, 0.0: best vs worst = (b, c); all pairs with margin 0.4 keeps b>a, a>c, b>c (differences
    0.5, 0.5, 1.0), with margin 0.6 only b>c; message prompts give conversational rows."""
    texts, rates = ["a", "b", "c"], [0.5, 1.0, 0.0]
    assert [(r["chosen"], r["rejected"]) for r in iterative_rows("x", texts, rates, "best_vs_worst", 0.0, Counter())] \
        == [("b", "c")]
    pairs = iterative_rows("x", texts, rates, "all_pairs", 0.4, Counter())
    assert sorted((r["chosen"], r["rejected"]) for r in pairs) == [("a", "c"), ("b", "a"), ("b", "c")]
    counts = Counter()
    assert len(iterative_rows("x", texts, rates, "all_pairs", 0.6, counts)) == 1 and counts["tied_pairs"] == 2
    prompt = [{"role": "user", "content": "x"}]
    (row,) = iterative_rows(prompt, texts, rates, "best_vs_worst", 0.0, Counter())
    assert row["chosen"] == [{"role": "assistant", "content": "b"}]


def test_spo_rewards_and_leave_one_out_baseline_by_hand():
    """K = 3 with P(0≻1) = 1, P(0≻2) = ½, P(1≻2) = 0: rewards r = ((1+½)/2, (0+0)/2, (½+1)/2) = (0.75, 0, 0.75)
    (they average ½: every comparison gives its two sides 1 in total). Leave-one-out advantages: 0.75 - (0+0.75)/2
    = 0.375, 0 - 0.75 = -0.75, 0.375. With β = 0.1 and log-ratios (1, 0, -1) the shaped rewards are (0.65, 0,
    0.85), advantages (0.65 - 0.425, 0 - 0.75, 0.85 - 0.325) = (0.225, -0.75, 0.525), and with log π = (-2, -3, -4)
    the loss is -(0.225·-2 + -0.75·-3 + 0.525·-4)/3 = -(-0.45 + 2.25 - 2.1)/3 = 0.1."""
    win = torch.tensor([[[0.5, 1.0, 0.5], [0.0, 0.5, 0.0], [0.5, 1.0, 0.5]]])
    rewards = self_play_rewards(win)
    assert rewards.tolist() == [[0.75, 0.0, 0.75]] and rewards.mean().item() == 0.5
    assert leave_one_out_advantages(rewards).tolist() == [[0.375, -0.75, 0.375]]
    policy = torch.tensor([[-2.0, -3.0, -4.0]], requires_grad=True)
    logps = GroupLogps(policy_logps=policy, tokens=torch.ones(1, 3), mask=torch.ones(1, 3, dtype=torch.bool),
                       reference_logps=torch.tensor([[-3.0, -3.0, -3.0]]), scores=rewards)
    out = spo_loss(logps, SPOParams(beta=0.1))
    assert out.losses.item() == pytest.approx(0.1)
    out.losses.sum().backward()
    assert policy.grad.tolist()[0] == pytest.approx([-0.225 / 3, 0.75 / 3, -0.525 / 3])


def test_spo_rewards_match_the_win_matrix_of_a_judge():
    """The online task's rewards come from win_rates(win_matrices(...)): lengths 1, 2, 3 beat 0, 1, 2 others of 2."""
    (matrix,), _ = win_matrices(length_judge(), ["x"], [["a", "bb", "ccc"]])
    assert win_rates(matrix) == [0.0, 0.5, 1.0]
    assert self_play_rewards(torch.tensor([matrix])).tolist() == [[0.0, 0.5, 1.0]]


def test_rejection_acceptance_probabilities_by_hand():
    """β = 0.5, rewards (1, 2, 3): exp((r - 3)/0.5) = e^-4, e^-2, 1."""
    assert acceptance_probabilities([1.0, 2.0, 3.0], 0.5) == pytest.approx([math.exp(-4), math.exp(-2), 1.0])
    assert acceptance_probabilities([1.0], 2.0, max_reward=3.0) == pytest.approx([math.exp(-1)])
    with pytest.raises(ValueError, match="must bound every reward"):
        acceptance_probabilities([4.0], 1.0, max_reward=3.0)


def test_rejection_sampler_draws_from_the_optimal_policy():
    """Toy policy over 4 outcomes, π_sft = (0.4, 0.3, 0.2, 0.1), rewards (0, 1, 2, 3), β = 1: π* ∝ π_sft·e^r =
    (0.4, 0.815, 1.478, 2.009)/4.702 = (0.085, 0.173, 0.314, 0.427). Algorithm 1 with N = 64 candidates from
    π_sft and M = 1, repeated 4000 times with a fixed seed: Pearson's χ² against π* stays below 11.34, the 1%
    critical value with 3 degrees of freedom; against π_sft it is far above."""
    rng = random.Random(0)
    pi_sft, rewards = [0.4, 0.3, 0.2, 0.1], [0.0, 1.0, 2.0, 3.0]
    weights = [p * math.exp(r) for p, r in zip(pi_sft, rewards, strict=True)]
    pi_star = [w / sum(weights) for w in weights]
    trials, counts = 4000, [0] * 4
    for _ in range(trials):
        candidates = rng.choices(range(4), weights=pi_sft, k=64)
        (first,) = rejection_sample([rewards[c] for c in candidates], 1, beta=1.0, rng=rng)
        counts[candidates[first]] += 1
    chi2 = sum((c - trials * p) ** 2 / (trials * p) for c, p in zip(counts, pi_star, strict=True))
    chi2_sft = sum((c - trials * p) ** 2 / (trials * p) for c, p in zip(counts, pi_sft, strict=True))
    assert chi2 < 11.34, (counts, chi2)
    assert chi2_sft > 1000


def test_rejection_sample_takes_distinct_candidates_and_stops():
    rng = random.Random(1)
    picked = rejection_sample([0.0, 5.0, 1.0, 2.0], 3, beta=0.1, rng=rng)
    assert len(picked) == len(set(picked)) == 3 and picked[0] == 1  # the best is always accepted in pass one
    assert sorted(rejection_sample([1.0, 1.0], 5, beta=1.0, rng=rng)) == [0, 1]


def test_tournament_is_single_elimination_with_every_match_a_pair():
    """8 players: 4 + 2 + 1 = 7 matches; the best (reward 7) wins all three of its matches; every pair's winner
    has the higher reward. 5 players: 2 + 1 + 1 = 4 matches (one bye per odd round)."""
    rewards = [3.0, 1.0, 7.0, 0.0, 5.0, 2.0, 6.0, 4.0]
    pairs = tournament_pairs(rewards, random.Random(3))
    assert len(pairs) == 7 and all(rewards[w] > rewards[lose] for w, lose in pairs)
    assert sum(w == 2 for w, _ in pairs) == 3 and all(lose != 2 for _, lose in pairs)
    assert len(tournament_pairs([1.0, 2.0, 3.0, 4.0, 5.0], random.Random(0))) == 4
