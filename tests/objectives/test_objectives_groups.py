"""Golden values, second implementations and special cases for NPO, D²O, DRO, Plackett-Luce and
Unlikelihood.

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

from preftune.objectives import make_params, preference_loss

from golden import (
    NAN,
    PAIRS,
    assert_values,
    group_logratios,
    random_group,
    random_pairs,
    sigmoid,
    softplus,
    tensors,
)

# ---------------------------------------------------------------------------------------------------- NPO

NEGATIVES = {"policy_logps": [[-2.0], [-3.0]], "reference_logps": [[-1.5], [-3.5]], "tokens": [[4], [2]],
             "mask": [[True], [True]]}  # h = [-0.5, 0.5]


def test_npo_golden():
    """β = 0.1: (2/β)·softplus(β·h) = 20·[softplus(-0.05), softplus(0.05)] = 20·[0.668460, 0.718460]
    = [13.369193, 14.369193]; rejected rewards β·h = [-0.05, 0.05], chosen NaN."""
    out = preference_loss("npo", **tensors(NEGATIVES), beta=0.1)
    assert_values(out.losses, [20 * softplus(-0.05), 20 * softplus(0.05)])
    assert_values(out.rejected_rewards, [-0.05, 0.05])
    assert_values(out.chosen_rewards, [NAN, NAN])


def test_npo_small_beta_is_gradient_ascent():
    """(2/β)·softplus(βh) = 2·log 2/β + h + βh²/4 + O(β³): as β → 0 the loss is h plus a constant and the
    gradient 2σ(βh) → 1, gradient ascent on the NLL of the negative (Zhang et al. 2024, §3)."""
    inputs = tensors(NEGATIVES)
    policy = inputs["policy_logps"].requires_grad_(True)
    beta = 1e-6
    out = preference_loss("npo", **inputs, beta=beta)
    assert_values(out.losses - 2 * math.log(2) / beta, [-0.5, 0.5], tol=1e-4)
    out.losses.sum().backward()
    assert_values(policy.grad[:, 0], [1.0, 1.0], tol=1e-6)


def test_npo_matches_paper_formula():
    """Eq. 3 as written: -(2/β)·log σ(-β·h) on random inputs."""
    g = random_group(6)
    out = preference_loss("npo", **tensors(g), beta=0.3)
    assert_values(out.losses, [-(2 / 0.3) * math.log(sigmoid(-0.3 * row[0])) for row in group_logratios(g)],
                  tol=1e-9)


# ---------------------------------------------------------------------------------------------------- D²O

D2O = {  # slot 0 the negative, slots 1..3 samples; example 2 has two samples (slot 3 absent)
    "policy_logps": [[-2.0, -1.0, -3.0, -1.9], [-4.0, -2.0, -1.2, 0.0]],
    "reference_logps": [[-1.5, -1.5, -2.5, -2.5], [-3.0, -2.5, -1.5, 0.0]],
    "tokens": [[3, 2, 4, 3], [5, 2, 2, 1]],
    "mask": [[True, True, True, True], [True, True, True, False]],
}  # h: [[-0.5, 0.5, -0.5, 0.6], [-1.0, 0.5, 0.3, -]]


def test_d2o_golden():
    """β = 1, α = 0.5. Sample means: (0.5 - 0.5 + 0.6)/3 = 0.2 and (0.5 + 0.3)/2 = 0.4 (the absent slot is not
    counted). Logits β·mean - α·h_l = [0.2 + 0.25, 0.4 + 0.5] = [0.45, 0.9]; losses softplus(-logit)
    = [0.493249, 0.341154]. Rewards: chosen [0.2, 0.4], rejected α·h_l = [-0.25, -0.5]."""
    out = preference_loss("d2o", **tensors(D2O), beta=1.0, alpha=0.5)
    assert_values(out.losses, [softplus(-0.45), softplus(-0.9)])
    assert_values(out.chosen_rewards, [0.2, 0.4])
    assert_values(out.rejected_rewards, [-0.25, -0.5])


def test_d2o_ignores_whatever_an_absent_slot_holds():
    """Padding is not guaranteed to be 0: NaN in the absent slot changes neither the loss nor the gradients."""
    inputs = tensors(D2O)
    inputs["policy_logps"][1, 3] = NAN
    policy = inputs["policy_logps"].requires_grad_(True)
    out = preference_loss("d2o", **inputs, beta=1.0, alpha=0.5)
    assert_values(out.losses, [softplus(-0.45), softplus(-0.9)])
    out.losses.sum().backward()
    assert torch.isfinite(policy.grad).all() and policy.grad[1, 3].item() == 0.0


def test_d2o_with_one_sample_and_alpha_equal_beta_is_dpo():
    """K = 1, α = β: -log σ(β·h(y_1) - β·h(y_l)) is DPO with the sample as the chosen completion."""
    p = random_pairs(7)
    group = {"policy_logps": [[r, c] for r, c in zip(p["policy_rejected_logps"], p["policy_chosen_logps"], strict=True)],
             "reference_logps": [[r, c] for r, c in zip(p["reference_rejected_logps"], p["reference_chosen_logps"],
                                                        strict=True)],
             "tokens": [[1, 1]] * 16, "mask": [[True, True]] * 16}
    out = preference_loss("d2o", **tensors(group), beta=0.3, alpha=0.3)
    dpo = preference_loss("dpo", **tensors(p), beta=0.3)
    torch.testing.assert_close(out.losses, dpo.losses)
    torch.testing.assert_close(out.chosen_rewards, dpo.chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, dpo.rejected_rewards)


def test_d2o_matches_second_implementation():
    g = random_group(8, slots=6, ragged=True)
    expected = []
    for h, mask in zip(group_logratios(g), g["mask"], strict=True):
        samples = [x for x, m in zip(h[1:], mask[1:], strict=True) if m]
        expected.append(softplus(-(0.1 / len(samples) * sum(samples) - 0.2 * h[0])))
    out = preference_loss("d2o", **tensors(g), beta=0.1, alpha=0.2)
    assert_values(out.losses, expected, tol=1e-9)


def test_d2o_needs_a_sample():
    inputs = tensors({**D2O, "mask": [[True, True, True, True], [True, False, False, False]]})
    with pytest.raises(ValueError, match="at least one sample"):
        preference_loss("d2o", **inputs)


# ---------------------------------------------------------------------------------------------------- DRO

DRO = {"policy_logps": [[-1.0], [-4.0]], "reference_logps": [[-1.5], [-3.0]], "tokens": [[2], [4]],
       "mask": [[True], [True]], "scores": [[1.0], [0.0]], "values": [0.2, 0.3]}  # h = [0.5, -1]


def test_dro_golden_value_and_gradients():
    """τ = 0.5. Residual s - V - τh = [1 - 0.2 - 0.25, 0 - 0.3 + 0.5] = [0.55, 0.2]; losses ½·residual²
    = [0.15125, 0.02] (Eq. 9). Gradients (Eq. 10): d/dlp = -(s - V) + τh = [-0.8 + 0.25, 0.3 - 0.5]
    = [-0.55, -0.2] (= -residual: Eq. 9's θ-gradient -τ·residual divided by τ); d/dV = -residual = [-0.55, -0.2].
    Rewards τh = [0.25, -0.5]: advantage s - V = [0.8, -0.3] puts the first under chosen, the second under
    rejected."""
    inputs = tensors(DRO)
    policy, values = inputs["policy_logps"].requires_grad_(True), inputs["values"].requires_grad_(True)
    out = preference_loss("dro", **inputs, beta=0.5)
    assert_values(out.losses, [0.15125, 0.02])
    out.losses.sum().backward()
    assert_values(policy.grad[:, 0], [-0.55, -0.2])
    assert_values(values.grad, [-0.55, -0.2])
    assert_values(out.chosen_rewards, [0.25, NAN])
    assert_values(out.rejected_rewards, [NAN, -0.5])
    assert out.metrics["advantage"].item() == pytest.approx(0.25)


def test_dro_policy_gradient_is_eq9_over_tau():
    """Autograd of ½(s - V - τh)² would give the policy -τ·residual; Eq. 10 gives -residual (and the value
    head the unscaled -residual) for every τ. Random inputs, three values of τ."""
    rng = random.Random(9)
    g = random_group(9)
    scores, values = [[rng.uniform(-1, 1)] for _ in range(16)], [rng.gauss(0, 1) for _ in range(16)]
    h = [row[0] for row in group_logratios(g)]
    for tau in (0.1, 1.0, 3.0):
        inputs = tensors({**g, "scores": scores, "values": values})
        policy, v = inputs["policy_logps"].requires_grad_(True), inputs["values"].requires_grad_(True)
        out = preference_loss("dro", **inputs, beta=tau)
        residual = [s[0] - b - tau * x for s, b, x in zip(scores, values, h, strict=True)]
        assert_values(out.losses, [0.5 * r * r for r in residual], tol=1e-9)
        out.losses.sum().backward()
        assert_values(policy.grad[:, 0], [-r for r in residual], tol=1e-9)
        assert_values(v.grad, [-r for r in residual], tol=1e-9)


# ------------------------------------------------------------------------------------------ Plackett-Luce

RANKED = {  # best first; example 2 has two completions (slot 3 absent)
    "policy_logps": [[-1.0, -2.0, -1.3], [-4.0, -3.0, 0.0]],
    "reference_logps": [[-1.5, -1.5, -1.5], [-3.0, -3.5, 0.0]],
    "tokens": [[2, 4, 3], [4, 2, 1]],
    "mask": [[True, True, True], [True, True, False]],
}  # h: [[0.5, -0.5, 0.2], [-1.0, 0.5, -]]


def test_plackett_luce_golden():
    """β = 1. Example 1: -[0.5 - log(e^0.5 + e^-0.5 + e^0.2)] - [-0.5 - log(e^-0.5 + e^0.2)] - [0.2 - 0.2]
    = (1.246071 - 0.5) + (0.603186 + 0.5) = 1.849257. Example 2 (two present): -[-1 - log(e^-1 + e^0.5)]
    = softplus(1.5) = 1.701413, DPO on the pair. Rewards: best [0.5, -1], worst present [0.2, 0.5]."""
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    out = preference_loss("plackett_luce", **tensors(RANKED), beta=1.0)
    assert_values(out.losses, [-(0.5 - lse(0.5, -0.5, 0.2)) - (-0.5 - lse(-0.5, 0.2)), softplus(1.5)])
    assert_values(out.chosen_rewards, [0.5, -1.0])
    assert_values(out.rejected_rewards, [0.2, 0.5])


def test_plackett_luce_with_two_completions_is_dpo():
    """K = 2: -[βh_1 - log(e^{βh_1} + e^{βh_2})] - 0 = -log σ(β(h_1 - h_2)), DPO's Eq. 7, rewards included."""
    p = random_pairs(10)
    ranked = {"policy_logps": [list(x) for x in zip(p["policy_chosen_logps"], p["policy_rejected_logps"], strict=True)],
              "reference_logps": [list(x) for x in zip(p["reference_chosen_logps"], p["reference_rejected_logps"],
                                                       strict=True)],
              "tokens": [list(x) for x in zip(p["chosen_tokens"], p["rejected_tokens"], strict=True)],
              "mask": [[True, True]] * 16}
    out = preference_loss("plackett_luce", **tensors(ranked), beta=0.1)
    dpo = preference_loss("dpo", **tensors(p), beta=0.1)
    torch.testing.assert_close(out.losses, dpo.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, dpo.chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, dpo.rejected_rewards)


def test_plackett_luce_matches_second_implementation():
    """Lists of 2..6 completions: the product over k of softmax probabilities of slot k among slots k..end."""
    g = random_group(11, slots=6, ragged=True)
    expected = []
    for h, mask in zip(group_logratios(g), g["mask"], strict=True):
        z = [0.2 * x for x, m in zip(h, mask, strict=True) if m]
        expected.append(-sum(z[k] - math.log(sum(math.exp(x) for x in z[k:])) for k in range(len(z))))
    inputs = tensors(g)
    policy = inputs["policy_logps"].requires_grad_(True)
    out = preference_loss("plackett_luce", **inputs, beta=0.2)
    assert_values(out.losses, expected, tol=1e-9)
    out.losses.sum().backward()
    assert torch.isfinite(policy.grad).all() and not policy.grad[~inputs["mask"]].any()


def test_plackett_luce_needs_two_completions():
    inputs = tensors({**RANKED, "mask": [[True, True, True], [True, False, False]]})
    with pytest.raises(ValueError, match="at least one more"):
        preference_loss("plackett_luce", **inputs)


# ------------------------------------------------------------------------------------------ Unlikelihood


def test_unlikelihood_golden():
    """α = 1: -lp_c/n_c - log(1 - e^{lp_r/n_r}) = [0.5 - log(1 - e^-0.5), 1 - log(1 - e^-1.5)]
    = [0.5 + 0.932752, 1 + 0.252482] = [1.432752, 1.252482]; rewards lp/n: [-0.5, -1], [-0.5, -1.5]."""
    out = preference_loss("unlikelihood", **tensors(PAIRS), alpha=1.0)
    assert_values(out.losses, [0.5 - math.log(1 - math.exp(-0.5)), 1 - math.log(1 - math.exp(-1.5))])
    assert_values(out.chosen_rewards, [-0.5, -1.0])
    assert_values(out.rejected_rewards, [-0.5, -1.5])


def test_unlikelihood_alpha_zero_is_sft_and_gradient():
    """α = 0 is Preferred-FT (``sft``). With α = 0.5 the rejected gradient is α·p/(1 - p)/n_r, p = e^{lp_r/n_r}:
    [0.5·e^-0.5/(1 - e^-0.5)/4, 0.5·e^-1.5/(1 - e^-1.5)/2] = [0.192687, 0.071804]."""
    sft = preference_loss("sft", **tensors(PAIRS))
    torch.testing.assert_close(preference_loss("unlikelihood", **tensors(PAIRS), alpha=0.0).losses, sft.losses)
    inputs = tensors(PAIRS)
    rejected = inputs["policy_rejected_logps"].requires_grad_(True)
    preference_loss("unlikelihood", **inputs, alpha=0.5).losses.sum().backward()
    p1, p2 = math.exp(-0.5), math.exp(-1.5)
    assert_values(rejected.grad, [0.5 * p1 / (1 - p1) / 4, 0.5 * p2 / (1 - p2) / 2])


def test_unlikelihood_is_finite_when_the_rejected_completion_is_certain():
    """lp_r = 0 (p = 1): 1 - p is clamped at 1e-5, so the term is -log(1e-5) = 11.512925, not inf."""
    inputs = tensors({**PAIRS, "policy_rejected_logps": [0.0, -3.0]})
    out = preference_loss("unlikelihood", **inputs, alpha=1.0)
    assert out.losses[0].item() == pytest.approx(0.5 - math.log(1e-5))


def test_unlikelihood_matches_second_implementation():
    p = random_pairs(12)
    expected = [-c / nc - 0.7 * math.log(1 - math.exp(r / nr)) for c, nc, r, nr in zip(
        p["policy_chosen_logps"], p["chosen_tokens"], p["policy_rejected_logps"], p["rejected_tokens"], strict=True)]
    out = preference_loss("unlikelihood", **tensors(p), alpha=0.7)
    assert_values(out.losses, expected, tol=1e-9)


# ------------------------------------------------------------------------------------------------ parameters


@pytest.mark.parametrize(
    "name, values, message",
    [
        ("kto", {"beta": 0.0}, r"beta must be > 0"),
        ("kto", {"undesirable_weight": -1.0}, r"undesirable_weight must be >= 0"),
        ("bco", {"beta": -0.1}, r"beta must be > 0"),
        ("beta_dpo", {"rho": 0.0}, r"rho must be in \(0, 1\]"),
        ("beta_dpo", {"rho": 1.5}, r"rho must be in \(0, 1\]"),
        ("beta_dpo", {"momentum": 1.0}, r"momentum must be in \[0, 1.0\)"),
        ("beta_dpo", {"alpha": -0.5}, r"alpha must be >= 0"),
        ("npo", {"beta": 0.0}, r"beta must be > 0"),
        ("d2o", {"alpha": 0.0}, r"alpha must be > 0"),
        ("dro", {"beta": 0.0}, r"beta must be > 0"),
        ("plackett_luce", {"beta": -1.0}, r"beta must be > 0"),
        ("unlikelihood", {"alpha": -1.0}, r"alpha must be >= 0"),
        ("unlikelihood", {"beta": 0.1}, r"does not take parameter\(s\) beta; its parameters are: alpha"),
    ],
)
def test_bad_parameter_values(name, values, message):
    with pytest.raises(ValueError, match=message):
        make_params(name, values)


def test_bco_state_needs_both_keys():
    with pytest.raises(ValueError, match="'delta' and 'count'"):
        preference_loss("bco", **tensors(PAIRS), state={"delta": torch.tensor(0.0)})


@pytest.mark.parametrize("name", ["kto", "npo", "dro"])
def test_one_completion_shapes_reject_lists(name):
    inputs = {"policy_logps": [[-1.0, -2.0]] * 2, "reference_logps": [[-1.0, -2.0]] * 2, "tokens": [[1, 1]] * 2,
              "mask": [[True, True]] * 2, "labels": [True, False], "policy_kl_logps": [-1.0, -1.0],
              "reference_kl_logps": [-1.0, -1.0], "scores": [[1.0, 0.0]] * 2, "values": [0.0, 0.0]}
    needed = {"kto": ("labels", "policy_kl_logps", "reference_kl_logps"), "npo": (), "dro": ("scores", "values")}[name]
    keep = {"policy_logps", "reference_logps", "tokens", "mask", *needed}
    with pytest.raises(ValueError, match=r"one completion per example"):
        preference_loss(name, **tensors({k: v for k, v in inputs.items() if k in keep}))
