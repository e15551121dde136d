"""Golden values for every objective, with the arithmetic written out, plus a second implementation.

Expected numbers are computed with ``math`` from the formulas in the papers, never with torch, so they do not
depend on the code under test. Unless a test says otherwise, it uses the batch of two pairs below:

    policy_chosen_logps    = [-1.0, -4.0]   chosen_tokens   = [2, 4]
    policy_rejected_logps  = [-2.0, -3.0]   rejected_tokens = [4, 2]
    reference_chosen_logps = [-1.5, -3.0]   reference_rejected_logps = [-1.5, -3.5]

    h_c = policy - reference (chosen)   = [-1 + 1.5, -4 + 3]   = [ 0.5, -1.0]
    h_r = policy - reference (rejected) = [-2 + 1.5, -3 + 3.5] = [-0.5,  0.5]
    h_c - h_r = [1.0, -1.5]
    mean token log-probs a_c = lp_c / n_c = [-0.5, -1.0],  a_r = lp_r / n_r = [-0.5, -1.5]
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from preftune.objectives import make_params, preference_loss

from golden import PAIRS

H_C, H_R = [0.5, -1.0], [-0.5, 0.5]
A_C, A_R = [-0.5, -1.0], [-0.5, -1.5]
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


def softplus(x: float) -> float:
    """log(1 + e^x) = -log σ(-x)."""
    return math.log1p(math.exp(x))


def tensors(values: dict, reference: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    out = {}
    for key, value in values.items():
        if key in REFERENCE_KEYS and not reference:
            continue
        out[key] = torch.tensor(value) if key.endswith("_tokens") else torch.tensor(value, dtype=dtype)
    return out


def assert_values(tensor: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------- golden values


def test_dpo_golden():
    """β = 0.1: z = β(h_c - h_r) = [0.1, -0.15]; loss = -log σ(z) = log(1 + e^{-z})
    = [log(1 + e^{-0.1}), log(1 + e^{0.15})] = [0.644397, 0.770957]; rewards β·h = [0.05, -0.1], [-0.05, 0.05]."""
    out = preference_loss("dpo", **tensors(PAIRS), beta=0.1)
    assert_values(out.losses, [softplus(-0.1), softplus(0.15)])
    assert_values(out.losses, [0.6443967, 0.7709570])
    assert_values(out.chosen_rewards, [0.05, -0.1])
    assert_values(out.rejected_rewards, [-0.05, 0.05])


def test_cdpo_golden():
    """β = 0.1, ε = 0.2: loss = 0.8·(-log σ(z)) + 0.2·(-log σ(-z)) = 0.8·softplus(-z) + 0.2·softplus(z)
    = softplus(-z) + 0.2·z (since softplus(z) - softplus(-z) = z) = [0.644397 + 0.02, 0.770957 - 0.03]
    = [0.664397, 0.740957]."""
    out = preference_loss("dpo", **tensors(PAIRS), beta=0.1, label_smoothing=0.2)
    assert_values(out.losses, [0.8 * softplus(-z) + 0.2 * softplus(z) for z in (0.1, -0.15)])
    assert_values(out.losses, [0.6643967, 0.7409570])


def test_cdpo_rejects_pure_noise_labels():
    """ε = 1/2 says labels are pure noise: loss = ½ softplus(-z) + ½ softplus(z) = log(2 cosh(z/2)) is even in z,
    so it carries no preference at all; cDPO therefore takes ε in [0, 1/2). Just below, the loss is still
    log(2 cosh(z/2)) + (1/2 - ε)·(-z) = log(2 cosh 0.05) - 1e-8 for z = 0.1, ε = 0.4999999."""
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        preference_loss("dpo", **tensors(PAIRS), beta=0.1, label_smoothing=0.5)
    out = preference_loss("dpo", **tensors(PAIRS), beta=0.1, label_smoothing=0.4999999)
    assert_values(out.losses, [math.log(2 * math.cosh(0.05)) - 1e-8, math.log(2 * math.cosh(0.075)) + 1.5e-8])


def test_rpo_alpha_adds_chosen_nll_to_dpo():
    """rpo_alpha = 0.5: NLL = -lp_c/n_c = [1/2, 4/4] = [0.5, 1.0]; loss = DPO + 0.5·NLL
    = [0.644397 + 0.25, 0.770957 + 0.5] = [0.894397, 1.270957]; metric nll = mean = 0.75."""
    out = preference_loss("dpo", **tensors(PAIRS), beta=0.1, rpo_alpha=0.5)
    assert_values(out.losses, [softplus(-0.1) + 0.25, softplus(0.15) + 0.5])
    assert out.metrics["nll"].item() == pytest.approx(0.75, abs=1e-6)


def test_ipo_golden():
    """β = τ = 0.5, so the target gap 1/(2τ) = 1. Averaged log-ratios: h_c/n_c = [0.5/2, -1/4] = [0.25, -0.25],
    h_r/n_r = [-0.5/4, 0.5/2] = [-0.125, 0.25]; d = [0.375, -0.5];
    loss = (d - 1)² = [0.390625, 2.25]; rewards β·h/n = [0.125, -0.125], [-0.0625, 0.125]."""
    out = preference_loss("ipo", **tensors(PAIRS), beta=0.5)
    assert_values(out.losses, [(0.375 - 1) ** 2, (-0.5 - 1) ** 2])
    assert_values(out.losses, [0.390625, 2.25])
    assert_values(out.chosen_rewards, [0.125, -0.125])
    assert_values(out.rejected_rewards, [-0.0625, 0.125])


def test_ipo_minimum_is_at_target_gap():
    """β = 0.1 → target 1/(2β) = 5. With n = 1 and zero rejected log-ratio, d = h_c; loss (d - 5)² is 0 with
    zero gradient at h_c = 5 and (±0.5)² = 0.25 at h_c = 4.5 and 5.5."""
    h_c = torch.tensor([4.5, 5.0, 5.5], dtype=torch.float64, requires_grad=True)
    ones, zeros = torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.float64)
    out = preference_loss(
        "ipo", policy_chosen_logps=h_c - 10, chosen_tokens=ones, policy_rejected_logps=zeros - 3,
        rejected_tokens=ones, reference_chosen_logps=zeros - 10, reference_rejected_logps=zeros - 3, beta=0.1,
    )
    assert_values(out.losses, [0.25, 0.0, 0.25])
    out.losses.sum().backward()
    assert_values(h_c.grad, [-1.0, 0.0, 1.0])  # d/dh (h - 5)² = 2(h - 5)


def test_robust_golden():
    """β = 0.1, ε = 0.2: loss = [0.8·softplus(-z) - 0.2·softplus(z)] / 0.6 = [0.6·softplus(-z) - 0.2·z] / 0.6
    = softplus(-z) - z/3 = [0.644397 - 0.033333, 0.770957 + 0.05] = [0.611063, 0.820957]."""
    out = preference_loss("robust", **tensors(PAIRS), beta=0.1, label_smoothing=0.2)
    assert_values(out.losses, [(0.8 * softplus(-z) - 0.2 * softplus(z)) / 0.6 for z in (0.1, -0.15)])
    assert_values(out.losses, [0.6110633, 0.8209570])
    assert_values(out.chosen_rewards, [0.05, -0.1])
    assert_values(out.rejected_rewards, [-0.05, 0.05])


def test_robust_without_noise_is_dpo():
    """ε = 0: (1·softplus(-z) - 0) / 1 is exactly DPO's loss."""
    inputs = tensors(random_pairs(seed=3, batch=8), dtype=torch.float64)
    robust = preference_loss("robust", **inputs, beta=0.3, label_smoothing=0.0)
    dpo = preference_loss("dpo", **inputs, beta=0.3)
    torch.testing.assert_close(robust.losses, dpo.losses)
    torch.testing.assert_close(robust.chosen_rewards, dpo.chosen_rewards)


def test_hinge_golden_active_and_inactive():
    """β = 2: 1 - β(h_c - h_r) = [1 - 2·1.0, 1 + 2·1.5] = [-1, 4] → loss max(0, ·) = [0, 4].
    The first pair is past the margin (inactive, zero gradient); the second is active, d loss / d lp_c = -β = -2."""
    inputs = tensors(PAIRS)
    policy_chosen = inputs["policy_chosen_logps"].requires_grad_(True)
    out = preference_loss("hinge", **inputs, beta=2.0)
    assert_values(out.losses, [max(0.0, 1 - 2.0 * 1.0), max(0.0, 1 + 2.0 * 1.5)])
    assert_values(out.losses, [0.0, 4.0])
    assert_values(out.chosen_rewards, [1.0, -2.0])
    assert_values(out.rejected_rewards, [-1.0, 1.0])
    out.losses.sum().backward()
    assert_values(policy_chosen.grad, [0.0, -2.0])


def test_hinge_golden_both_active():
    """β = 0.5: 1 - 0.5·[1.0, -1.5] = [0.5, 1.75], both inside the margin."""
    out = preference_loss("hinge", **tensors(PAIRS), beta=0.5)
    assert_values(out.losses, [0.5, 1.75])


def test_simpo_golden():
    """β = 2, γ = 1 (absolute margin): β·a_c = [-1, -2], β·a_r = [-1, -3];
    β·a_c - β·a_r - γ = [0 - 1, 1 - 1] = [-1, 0]; loss = softplus(-(·)) = [log(1 + e), log 2] = [1.313262, 0.693147].
    The reference tensors are ignored (SimPO is reference-free)."""
    out = preference_loss("simpo", **tensors(PAIRS, reference=False), beta=2.0, gamma=1.0)
    assert_values(out.losses, [softplus(1.0), math.log(2)])
    assert_values(out.losses, [1.3132617, 0.6931472])
    assert_values(out.chosen_rewards, [-1.0, -2.0])
    assert_values(out.rejected_rewards, [-1.0, -3.0])


def test_simpo_zero_margin():
    """γ = 0 is allowed: β(a_c - a_r) = [0, 1] → loss = [log 2, log(1 + e^{-1})] = [0.693147, 0.313262]."""
    out = preference_loss("simpo", **tensors(PAIRS, reference=False), beta=2.0, gamma=0.0)
    assert_values(out.losses, [math.log(2), softplus(-1.0)])


def test_cpo_golden():
    """β = 0.1, α = 1: lp_c - lp_r = [-1 + 2, -4 + 3] = [1, -1]; preference = softplus(-β·[1, -1])
    = [softplus(-0.1), softplus(0.1)] = [0.644397, 0.744397]; NLL = -lp_c/n_c = [0.5, 1.0];
    loss = [1.144397, 1.744397]; rewards β·lp = [-0.1, -0.4], [-0.2, -0.3];
    metrics nll = 0.75, preference_loss = (0.644397 + 0.744397)/2 = 0.694397."""
    out = preference_loss("cpo", **tensors(PAIRS, reference=False), beta=0.1, alpha=1.0)
    assert_values(out.losses, [softplus(-0.1) + 0.5, softplus(0.1) + 1.0])
    assert_values(out.losses, [1.1443967, 1.7443967])
    assert_values(out.chosen_rewards, [-0.1, -0.4])
    assert_values(out.rejected_rewards, [-0.2, -0.3])
    assert out.metrics["nll"].item() == pytest.approx(0.75, abs=1e-6)
    assert out.metrics["preference_loss"].item() == pytest.approx((softplus(-0.1) + softplus(0.1)) / 2, abs=1e-6)


def test_orpo_golden():
    """β = λ = 0.1. log odds(a) = a - log(1 - e^a):
      log odds(-0.5) = -0.5 - log(1 - 0.606531) = -0.5 + 0.932752 = 0.432752  (chosen and rejected of pair 1)
      log odds(-1.0) = -1.0 - log(1 - 0.367879) = -1.0 + 0.458675 = -0.541325
      log odds(-1.5) = -1.5 - log(1 - 0.223130) = -1.5 + 0.252482 = -1.247518
    diff = [0, -0.541325 + 1.247518] = [0, 0.706193]; ratio = log σ(diff) = [-log 2, -log(1 + e^{-0.706193})]
    = [-0.693147, -0.401135]; loss = -a_c - β·ratio = [0.5 + 0.069315, 1.0 + 0.040114] = [0.569315, 1.040114];
    rewards β·a = [-0.05, -0.1], [-0.05, -0.15]; metrics: log_odds_ratio = mean ratio = -0.547141,
    log_odds_chosen = mean diff = 0.353096, nll = 0.75."""
    def log_odds(a: float) -> float:
        return a - math.log(1 - math.exp(a))

    diff = [log_odds(-0.5) - log_odds(-0.5), log_odds(-1.0) - log_odds(-1.5)]
    ratio = [-softplus(-d) for d in diff]
    out = preference_loss("orpo", **tensors(PAIRS, reference=False), beta=0.1)
    assert_values(out.losses, [0.5 - 0.1 * ratio[0], 1.0 - 0.1 * ratio[1]])
    assert_values(out.losses, [0.5693147, 1.0401135])
    assert_values(out.chosen_rewards, [-0.05, -0.1])
    assert_values(out.rejected_rewards, [-0.05, -0.15])
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(sum(ratio) / 2, abs=1e-6)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(sum(diff) / 2, abs=1e-6)
    assert out.metrics["nll"].item() == pytest.approx(0.75, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_orpo_ratio_is_negative_softplus(seed):
    """For one pair, log σ(x) = -softplus(-x): the logged ratio equals -softplus(-log_odds_chosen)."""
    pair = tensors(random_pairs(seed=seed, batch=1), reference=False, dtype=torch.float64)
    out = preference_loss("orpo", **pair, beta=0.1)
    diff = out.metrics["log_odds_chosen"].item()
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(-softplus(-diff), abs=1e-12)


def test_sft_golden_on_pairs():
    """loss = -lp_c/n_c = [0.5, 1.0]; rewards are mean token log-probs: a_c = [-0.5, -1.0], a_r = [-0.5, -1.5]."""
    out = preference_loss("sft", **tensors(PAIRS, reference=False))
    assert_values(out.losses, [0.5, 1.0])
    assert_values(out.chosen_rewards, A_C)
    assert_values(out.rejected_rewards, A_R)


def test_sft_golden_on_completions_only():
    """No rejected completion: loss = [1/2, 4/4] = [0.5, 1.0]; SFT on single completions has no reward to report
    (it would only repeat the loss): both rewards are NaN, which the metrics leave out."""
    chosen = {k: v for k, v in tensors(PAIRS).items() if k in ("policy_chosen_logps", "chosen_tokens")}
    out = preference_loss("sft", **chosen)
    assert_values(out.losses, [0.5, 1.0])
    assert torch.isnan(out.chosen_rewards).all() and torch.isnan(out.rejected_rewards).all()


@pytest.mark.parametrize(
    "name, values, message",
    [
        ("dpo", {"beta": 0.0}, r"beta must be > 0"),
        ("ipo", {"beta": -1.0}, r"beta must be > 0"),
        ("robust", {"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ("robust", {"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
        ("dpo", {"label_smoothing": 0.6}, r"label_smoothing must be in \[0, 0.5\)"),
        ("simpo", {"gamma": -0.5}, r"gamma must be >= 0"),
        ("cpo", {"alpha": -1.0}, r"alpha must be >= 0"),
        ("orpo", {"beta": 0.0}, r"beta must be > 0"),
        ("hinge", {"beta": float("nan")}, r"beta must be > 0"),
    ],
)
def test_bad_parameter_values_name_parameter_and_range(name, values, message):
    with pytest.raises(ValueError, match=message):
        make_params(name, values)


def test_parameter_types():
    """Numbers from YAML arrive as int or, for ``1e-1`` (YAML 1.1), as a string; booleans are never numbers."""
    assert make_params("simpo", {"beta": 2, "gamma": "1e-1"}).gamma == pytest.approx(0.1)
    with pytest.raises(TypeError, match="parameter beta expects float"):
        make_params("dpo", {"beta": True})
    with pytest.raises(TypeError, match="parameter beta expects float"):
        make_params("dpo", {"beta": "strong"})
    with pytest.raises(ValueError, match=r"its parameters are: \(none\)"):
        make_params("sft", {"beta": 0.1})


# ------------------------------------------------------------------------------------ second implementation


def random_pairs(seed: int, batch: int = 16) -> dict:
    """Summed log-probs -U(1, 50), token counts 1..40, as plain lists."""
    rng = random.Random(seed)
    pairs = {}
    for key in PAIRS:
        if key.endswith("_tokens"):
            pairs[key] = [rng.randint(1, 40) for _ in range(batch)]
        else:
            pairs[key] = [-rng.uniform(1, 50) for _ in range(batch)]
    return pairs


def log_sigmoid(x: float) -> float:
    return -softplus(-x)


def reference_losses(name: str, p: dict, params: dict) -> tuple[list[float], list[float], list[float]]:
    """Losses and rewards from the papers' formulas, one example at a time in plain Python."""
    losses, chosen, rejected = [], [], []
    for i in range(len(p["chosen_tokens"])):
        lp_c, lp_r = p["policy_chosen_logps"][i], p["policy_rejected_logps"][i]
        n_c, n_r = p["chosen_tokens"][i], p["rejected_tokens"][i]
        h_c, h_r = lp_c - p["reference_chosen_logps"][i], lp_r - p["reference_rejected_logps"][i]
        beta = params["beta"]
        if name == "dpo":
            z, eps = beta * (h_c - h_r), params["label_smoothing"]
            loss, rewards = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z), (beta * h_c, beta * h_r)
        elif name == "ipo":
            loss, rewards = (h_c / n_c - h_r / n_r - 1 / (2 * beta)) ** 2, (beta * h_c / n_c, beta * h_r / n_r)
        elif name == "hinge":
            loss, rewards = max(0.0, 1 - beta * (h_c - h_r)), (beta * h_c, beta * h_r)
        elif name == "simpo":
            rewards = (beta * lp_c / n_c, beta * lp_r / n_r)
            loss = -log_sigmoid(rewards[0] - rewards[1] - params["gamma"])
        elif name == "cpo":
            loss = -log_sigmoid(beta * (lp_c - lp_r)) + params["alpha"] * (-lp_c / n_c)
            rewards = (beta * lp_c, beta * lp_r)
        elif name == "orpo":
            a_c, a_r = lp_c / n_c, lp_r / n_r
            odds_c, odds_r = math.exp(a_c) / (1 - math.exp(a_c)), math.exp(a_r) / (1 - math.exp(a_r))
            loss, rewards = -a_c - beta * log_sigmoid(math.log(odds_c / odds_r)), (beta * a_c, beta * a_r)
        losses.append(loss)
        chosen.append(rewards[0])
        rejected.append(rewards[1])
    return losses, chosen, rejected


@pytest.mark.parametrize(
    "name, params",
    [
        ("dpo", {"beta": 0.1, "label_smoothing": 0.0}),
        ("dpo", {"beta": 0.5, "label_smoothing": 0.3}),
        ("ipo", {"beta": 0.1}),
        ("hinge", {"beta": 0.05}),
        ("simpo", {"beta": 2.5, "gamma": 1.4}),
        ("cpo", {"beta": 0.1, "alpha": 0.7}),
        ("orpo", {"beta": 0.25}),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_second_implementation(name, params, seed):
    pairs = random_pairs(seed)
    losses, chosen, rejected = reference_losses(name, pairs, params)
    out = preference_loss(name, **tensors(pairs, dtype=torch.float64), **params)
    assert_values(out.losses, losses, tol=1e-9)
    assert_values(out.chosen_rewards, chosen, tol=1e-9)
    assert_values(out.rejected_rewards, rejected, tol=1e-9)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_dpo_gradient_closed_form(eps):
    """d loss / d lp_c = -β(1-ε)σ(-z) + εβσ(z), z = β(h_c - h_r); the rejected gradient is its negative."""
    beta = 0.3
    inputs = tensors(random_pairs(seed=7), dtype=torch.float64)
    chosen = inputs["policy_chosen_logps"].requires_grad_(True)
    rejected = inputs["policy_rejected_logps"].requires_grad_(True)
    preference_loss("dpo", **inputs, beta=beta, label_smoothing=eps).losses.sum().backward()
    h_c = chosen.detach() - inputs["reference_chosen_logps"]
    h_r = rejected.detach() - inputs["reference_rejected_logps"]
    expected = []
    for z in (beta * (h_c - h_r)).tolist():
        sig = 1 / (1 + math.exp(-z))
        expected.append(-beta * (1 - eps) * (1 - sig) + eps * beta * sig)
    assert_values(chosen.grad, expected, tol=1e-9)
    assert_values(rejected.grad, [-g for g in expected], tol=1e-9)
