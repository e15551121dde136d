"""Golden values, second implementations and state round trips for the objectives with batch statistics:
KTO, BCO and β-DPO.

Expected numbers are ``math`` expressions of the arithmetic written beside them, never torch. Paired golden
tests use the batch of ``tests/test_objectives.py`` (repeated so this file stands alone):

    policy_chosen_logps    = [-1.0, -4.0]   chosen_tokens   = [2, 4]
    policy_rejected_logps  = [-2.0, -3.0]   rejected_tokens = [4, 2]
    reference_chosen_logps = [-1.5, -3.0]   reference_rejected_logps = [-1.5, -3.5]

    h_c = [0.5, -1.0],  h_r = [-0.5, 0.5],  h_c - h_r = [1.0, -1.5]          (log-ratios, sums)
    lp_c/n_c = [-0.5, -1.0],  lp_r/n_r = [-0.5, -1.5]                          (mean token log-probs)

The second implementations loop over examples in plain Python. Where TRL implements the objective they follow
TRL's formula (KTO: TRL 1.16 ``kto_trainer.py``; BCO: ``bco_pair`` with ``RunningMoments`` as in TRL < 1.0);
β-DPO follows the authors' code (junkangwu/beta-DPO) with its sampling made deterministic; the others follow
the papers.
"""


from __future__ import annotations

import math
import random

import pytest
import torch

from preftune.objectives import preference_loss

from golden import (
    NAN,
    PAIRS,
    assert_values,
    group_logratios,
    pair_logratios,
    random_group,
    random_pairs,
    sigmoid,
    softplus,
    tensors,
)

# ---------------------------------------------------------------------------------------------------- KTO

KTO = {  # B = 2, K = 1: r = [-1 + 1.5, -4 + 3] = [0.5, -1.0]; mismatched-pair log-ratios [0.5, 0.1]
    "policy_logps": [[-1.0], [-4.0]], "reference_logps": [[-1.5], [-3.0]], "tokens": [[2], [4]],
    "mask": [[True], [True]], "labels": [True, False],
    "policy_kl_logps": [-2.0, -3.0], "reference_kl_logps": [-2.5, -3.1],
}


def test_kto_golden():
    """β = 1, λ_D = 1, λ_U = 2. ẑ0 = max(0, mean([-2 + 2.5, -3 + 3.1])) = max(0, (0.5 + 0.1)/2) = 0.3.
    Desirable (example 1): 1·(1 - σ(1·(0.5 - 0.3))) = 1 - σ(0.2) = 0.450166;
    undesirable (example 2): 2·(1 - σ(1·(0.3 - (-1)))) = 2(1 - σ(1.3)) = 0.428330.
    Rewards β·r: chosen [0.5, NaN], rejected [NaN, -1]; metric kl = 0.3."""
    out = preference_loss("kto", **tensors(KTO), beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    assert_values(out.losses, [1 - sigmoid(0.2), 2 * (1 - sigmoid(1.3))])
    assert_values(out.chosen_rewards, [0.5, NAN])
    assert_values(out.rejected_rewards, [NAN, -1.0])
    assert out.metrics["kl"].item() == pytest.approx(0.3)


def test_kto_on_a_batch_of_one_uses_the_last_reference_point():
    """B = 1 (an epoch's remainder) has no mismatched row: ẑ0 is the last one estimated, 0.3 from the golden
    batch above, carried as state; desirable r = 0.5 at β = 1: 1 - σ(0.5 - 0.3) = 1 - σ(0.2). With no estimate
    yet, ẑ0 = 0 (its floor): 1 - σ(0.5)."""
    first = preference_loss("kto", **tensors(KTO), beta=1.0)
    assert first.state["kto/kl"].item() == pytest.approx(0.3)
    one = {k: tensors(KTO)[k][:1] for k in ("policy_logps", "reference_logps", "tokens", "mask", "labels")}
    out = preference_loss("kto", **one, beta=1.0, state=first.state)
    assert_values(out.losses, [1 - sigmoid(0.2)])
    assert out.state == {} and out.metrics["kl"].item() == pytest.approx(0.3)
    assert_values(preference_loss("kto", **one, beta=1.0).losses, [1 - sigmoid(0.5)])


def test_kto_reference_point_is_clamped_and_detached():
    """Mismatched log-ratios [-3 + 2, -3 + 2] = [-1, -1]: mean -1 < 0, so ẑ0 = 0 and the losses are
    1 - σ(β·0.5) and 1 - σ(β·1) at β = 1 = [0.377541, 0.268941]. No gradient reaches the KL rows; the desirable
    example's d loss / d lp = -β σ(z)(1 - σ(z)) at z = 0.5: -0.235004."""
    inputs = tensors({**KTO, "policy_kl_logps": [-3.0, -3.0], "reference_kl_logps": [-2.0, -2.0]})
    policy, kl_rows = inputs["policy_logps"].requires_grad_(True), inputs["policy_kl_logps"].requires_grad_(True)
    out = preference_loss("kto", **inputs, beta=1.0)
    assert_values(out.losses, [1 - sigmoid(0.5), 1 - sigmoid(1.0)])
    assert out.metrics["kl"].item() == 0.0
    out.losses.sum().backward()
    assert kl_rows.grad is None or not kl_rows.grad.any()
    assert policy.grad[0, 0].item() == pytest.approx(-sigmoid(0.5) * (1 - sigmoid(0.5)))


@pytest.mark.parametrize("params", [{"beta": 0.1}, {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7}])
def test_kto_matches_trl_formula(params):
    """TRL 1.16 ``KTOTrainer._compute_loss``: kl = mean(KL_logps - ref_KL_logps).clamp(min=0); chosen losses
    1 - σ(β(h - kl)), rejected 1 - σ(β(kl - h)), weighted; rewards β·h. (TRL concatenates chosen then
    rejected; here the losses stay in batch order.)"""
    rng = random.Random(3)
    g = random_group(3)
    labels = [rng.random() < 0.5 for _ in range(16)]
    kl_policy, kl_reference = [-rng.uniform(1, 50) for _ in range(16)], [-rng.uniform(1, 50) for _ in range(16)]
    kl = max(0.0, sum(a - b for a, b in zip(kl_policy, kl_reference, strict=True)) / 16)
    beta, w_d, w_u = params["beta"], params.get("desirable_weight", 1.0), params.get("undesirable_weight", 1.0)
    h = [row[0] for row in group_logratios(g)]
    expected = [w_d * (1 - sigmoid(beta * (x - kl))) if d else w_u * (1 - sigmoid(beta * (kl - x)))
                for x, d in zip(h, labels, strict=True)]
    out = preference_loss("kto", **tensors({**g, "labels": labels, "policy_kl_logps": kl_policy,
                                            "reference_kl_logps": kl_reference}), **params)
    assert_values(out.losses, expected, tol=1e-9)
    assert_values(out.chosen_rewards, [beta * x if d else NAN for x, d in zip(h, labels, strict=True)], tol=1e-9)
    assert_values(out.rejected_rewards, [NAN if d else beta * x for x, d in zip(h, labels, strict=True)], tol=1e-9)


# ---------------------------------------------------------------------------------------------------- BCO


def test_bco_golden_first_step():
    """β = 1: r_c = [0.5, -1], r_r = [-0.5, 0.5]; no state, so δ = mean of the 4 rewards = -0.5/4 = -0.125.
    losses = softplus(-(r_c - δ)) + softplus(r_r - δ) = [softplus(-0.625) + softplus(-0.375),
    softplus(0.875) + softplus(0.625)] = [0.428701 + 0.523123, 1.223445 + 1.053701] = [0.951824, 2.277145].
    State out: delta = -0.125, count = 4."""
    out = preference_loss("bco", **tensors(PAIRS), beta=1.0)
    assert_values(out.losses, [softplus(-0.625) + softplus(-0.375), softplus(0.875) + softplus(0.625)])
    assert_values(out.chosen_rewards, [0.5, -1.0])
    assert_values(out.rejected_rewards, [-0.5, 0.5])
    assert out.state["delta"].item() == pytest.approx(-0.125)
    assert out.state["count"].item() == 4 and not out.state["count"].is_floating_point()
    assert out.metrics["delta"].item() == pytest.approx(-0.125)


def test_bco_state_round_trip():
    """State in: δ = 0.5 over 4 rewards seen. This batch's 4 rewards have mean -0.125, so
    δ = (4·0.5 + 4·(-0.125))/8 = 1.5/8 = 0.1875, count 8. losses = softplus(-(r_c - δ)) + softplus(r_r - δ)
    = [softplus(-0.3125) + softplus(-0.6875), softplus(1.1875) + softplus(0.3125)] = [0.956406, 2.315245].
    A third call with that state and the same batch: δ = (8·0.1875 + 4·(-0.125))/12 = 1/12, count 12."""
    state = {"delta": torch.tensor(0.5), "count": torch.tensor(4)}
    out = preference_loss("bco", **tensors(PAIRS), beta=1.0, state=state)
    assert_values(out.losses, [softplus(-0.3125) + softplus(-0.6875), softplus(1.1875) + softplus(0.3125)])
    assert out.state["delta"].item() == pytest.approx(0.1875)
    assert out.state["count"].item() == 8
    third = preference_loss("bco", **tensors(PAIRS), beta=1.0, state=out.state)
    assert third.state["delta"].item() == pytest.approx(1 / 12)
    assert third.state["count"].item() == 12


def test_bco_with_zero_shift_is_trl_116_bco_pair():
    """When δ = 0 (here: the batch's rewards sum to zero and there is no state) the loss is TRL 1.16's
    ``bco_pair``, -log σ(r_c) - log σ(-r_r), which has no reward shift."""
    p = random_pairs(0)
    h_c, h_r = pair_logratios(p)
    shift = (sum(h_c) + sum(h_r)) / 32  # subtract the mean log-ratio from every policy log-prob
    p["policy_chosen_logps"] = [x - shift for x in p["policy_chosen_logps"]]
    p["policy_rejected_logps"] = [x - shift for x in p["policy_rejected_logps"]]
    h_c, h_r = pair_logratios(p)
    out = preference_loss("bco", **tensors(p), beta=0.1)
    assert out.state["delta"].item() == pytest.approx(0.0, abs=1e-12)
    assert_values(out.losses, [softplus(-0.1 * c) + softplus(0.1 * r) for c, r in zip(h_c, h_r, strict=True)],
                  tol=1e-9)


class RunningMoments:
    """TRL's ``RunningMoments`` mean (from stable-baselines3), without the variance: count-weighted."""

    def __init__(self):
        self.mean, self.count = 0.0, 1e-24

    def update(self, values: list[float]) -> None:
        total = self.count + len(values)
        self.mean += (sum(values) / len(values) - self.mean) * len(values) / total
        self.count = total


def test_bco_matches_running_moments_over_steps():
    """Three batches (sizes 16, 16, 5) in sequence, the state carried: δ is the mean of every reward seen so far,
    current batch included, as TRL's ``RunningMoments.update`` then ``.mean``."""
    running, state, beta = RunningMoments(), {}, 0.2
    for seed, batch in ((0, 16), (1, 16), (2, 5)):
        p = random_pairs(seed, batch)
        h_c, h_r = pair_logratios(p)
        running.update([beta * x for x in h_c + h_r])
        expected = [softplus(-(beta * c - running.mean)) + softplus(beta * r - running.mean)
                    for c, r in zip(h_c, h_r, strict=True)]
        out = preference_loss("bco", **tensors(p), beta=beta, state=state)
        assert_values(out.losses, expected, tol=1e-9)
        assert out.state["delta"].item() == pytest.approx(running.mean, abs=1e-12)
        state = out.state


# ------------------------------------------------------------------------------------------------- β-DPO


def test_beta_dpo_golden_with_state():
    """β0 = 0.1, α = 0.6, m = 0.9, ρ = 0.8; M = h_c - h_r = [1, -1.5], batch mean -0.25; state M0 = 0.
    Eq. 7: M0 = 0.9·0 + 0.1·(-0.25) = -0.025. Keep ⌊0.8·2⌋ = 1 pair, the one closest to M0: |1 + 0.025| = 1.025
    < |-1.5 + 0.025| = 1.475, so pair 1. Eq. 6: β = 0.1·(1 + 0.6·(1 - (-0.025))) = 0.1·1.615 = 0.1615.
    Losses, averaged over kept pairs (weight B/k = 2): [2·softplus(-0.1615·1), 0] = [1.231308, 0].
    Rewards β0·h: [0.05, -0.1], [-0.05, 0.05]. State out M0 = -0.025; metrics beta 0.1615, kept_fraction 0.5."""
    out = preference_loss("beta_dpo", **tensors(PAIRS), beta=0.1, alpha=0.6, momentum=0.9, rho=0.8,
                          state={"margin_mean": torch.tensor(0.0)})
    assert_values(out.losses, [2 * softplus(-0.1615), 0.0])
    assert_values(out.chosen_rewards, [0.05, -0.1])
    assert_values(out.rejected_rewards, [-0.05, 0.05])
    assert out.state["margin_mean"].item() == pytest.approx(-0.025)
    assert out.metrics["beta"].item() == pytest.approx(0.1615)
    assert out.metrics["kept_fraction"].item() == pytest.approx(0.5)


def test_beta_dpo_first_step_and_round_trip():
    """First call, no state, ρ = 1: M0 = mean M = -0.25 (initialised from the batch), both pairs kept, and
    β = 0.1·(1 + 0.6·(-0.25 - (-0.25))) = 0.1: plain DPO, [softplus(-0.1), softplus(0.15)].
    Second call with that state on a batch with M = [2, 1] (mean 1.5): M0 = 0.9·(-0.25) + 0.1·1.5 = -0.075,
    β = 0.1·(1 + 0.6·(1.5 + 0.075)) = 0.1945; losses [softplus(-0.389), softplus(-0.1945)] = [0.517444, 0.600619]."""
    first = preference_loss("beta_dpo", **tensors(PAIRS), beta=0.1, alpha=0.6, rho=1.0)
    assert_values(first.losses, [softplus(-0.1), softplus(0.15)])
    assert first.state["margin_mean"].item() == pytest.approx(-0.25)
    other = {**PAIRS, "policy_chosen_logps": [0.0, -1.5]}  # h_c = [1.5, 1.5], h_r = [-0.5, 0.5]: M = [2, 1]
    second = preference_loss("beta_dpo", **tensors(other), beta=0.1, alpha=0.6, rho=1.0, state=first.state)
    assert second.state["margin_mean"].item() == pytest.approx(-0.075)
    assert second.metrics["beta"].item() == pytest.approx(0.1945)
    assert_values(second.losses, [softplus(-0.389), softplus(-0.1945)])


def test_beta_dpo_without_adaptation_is_dpo():
    """α = 0 and ρ = 1: β stays β0 and nothing is filtered, whatever the state: exactly DPO."""
    inputs = tensors(random_pairs(4))
    dpo = preference_loss("dpo", **inputs, beta=0.2)
    for state in ({}, {"margin_mean": torch.tensor(3.0)}):
        out = preference_loss("beta_dpo", **inputs, beta=0.2, alpha=0.0, rho=1.0, state=state)
        torch.testing.assert_close(out.losses, dpo.losses, rtol=0, atol=1e-15)
        torch.testing.assert_close(out.chosen_rewards, dpo.chosen_rewards)


def _beta_dpo_reference(p: dict, q: dict, margin_mean: float | None) -> tuple[list[float], float]:
    """The authors' algorithm (junkangwu/beta-DPO ``preference_loss`` + ``update_and_sync_tensor_mean``) with
    ``torch.multinomial`` replaced by the ⌊ρB⌋ largest Gaussian weights exp(-½((M - M0)/σ)²)."""
    h_c, h_r = pair_logratios(p)
    gaps = [c - r for c, r in zip(h_c, h_r, strict=True)]
    mean = sum(gaps) / len(gaps)
    m0 = mean if margin_mean is None else q["momentum"] * margin_mean + (1 - q["momentum"]) * mean
    sigma = 1.0  # any σ > 0 gives the same order of weights
    weights = [math.exp(-0.5 * ((g - m0) / sigma) ** 2) for g in gaps]
    kept = max(1, int(len(gaps) * q["rho"] + 1e-9))
    order = sorted(range(len(gaps)), key=lambda i: -weights[i])[:kept]  # stable: earlier pair first on ties
    beta = max(1e-3, q["beta"] * (1 + q["alpha"] * (sum(gaps[i] for i in order) / kept - m0)))
    return [softplus(-beta * g) * len(gaps) / kept if i in order else 0.0 for i, g in enumerate(gaps)], m0


@pytest.mark.parametrize("q", [{"beta": 0.1, "alpha": 0.6, "momentum": 0.9, "rho": 0.8},
                               {"beta": 0.05, "alpha": 1.0, "momentum": 0.5, "rho": 0.5}])
def test_beta_dpo_matches_authors_algorithm_over_steps(q):
    state, margin_mean = {}, None
    for seed, batch in ((0, 16), (1, 16), (2, 7)):
        p = random_pairs(seed, batch)
        expected, margin_mean = _beta_dpo_reference(p, q, margin_mean)
        out = preference_loss("beta_dpo", **tensors(p), **q, state=state)
        assert_values(out.losses, expected, tol=1e-9)
        assert out.state["margin_mean"].item() == pytest.approx(margin_mean, abs=1e-12)
        state = out.state


def test_beta_dpo_clamps_beta():
    """A batch margin far below M0 would make β negative; the authors clamp it at 1e-3."""
    out = preference_loss("beta_dpo", **tensors(PAIRS), beta=0.1, alpha=1.0, rho=1.0,
                          state={"margin_mean": torch.tensor(100.0)})
    assert out.metrics["beta"].item() == pytest.approx(1e-3)


