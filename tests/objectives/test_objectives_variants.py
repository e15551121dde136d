"""Golden values and second implementations for the DPO variants.

Expected numbers are computed with ``math`` from the papers' formulas, never with torch. Golden tests use the
batch of ``tests/test_objectives.py`` (repeated here so this file stands alone):

    policy_chosen_logps    = [-1.0, -4.0]   chosen_tokens   = [2, 4]
    policy_rejected_logps  = [-2.0, -3.0]   rejected_tokens = [4, 2]
    reference_chosen_logps = [-1.5, -3.0]   reference_rejected_logps = [-1.5, -3.5]

    h_c = [0.5, -1.0],  h_r = [-0.5, 0.5],  h_c - h_r = [1.0, -1.5]          (log-ratios, sums)
    policy margin lp_c - lp_r = [1, -1],  reference margin = [0, 0.5]
    h_c/n_c = [0.25, -0.25],  h_r/n_r = [-0.125, 0.25]

The second implementations (``reference_losses``) loop over examples in plain Python. Where TRL 1.16 implements
the objective (``trl/trainer/dpo_trainer.py::_compute_loss``) they follow TRL's formula, named per branch;
``dpop``, ``gpo`` and ``slic`` follow the papers (TRL has none of them). ``f_alpha`` follows the f-DPO
paper, whose α is TRL 1.16's ``1 - f_alpha_divergence_coef`` (tested separately below).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from preftune.objectives import make_params, preference_loss

from golden import PAIRS


def softplus(x: float) -> float:
    """log(1 + e^x) = -log σ(-x), without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def tensors(values: dict, reference: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    return {key: torch.tensor(value) if key.endswith("_tokens") else torch.tensor(value, dtype=dtype)
            for key, value in values.items() if reference or not key.startswith("reference_")}


def assert_values(tensor: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype), rtol=tol, atol=tol)


def random_pairs(seed: int, batch: int = 16, ones: bool = False) -> dict:
    """Summed log-probs -U(1, 50), token counts 1..40 (or all 1), as plain lists."""
    rng = random.Random(seed)
    return {
        key: [1 if ones else rng.randint(1, 40) for _ in range(batch)]
        if key.endswith("_tokens") else [-rng.uniform(1, 50) for _ in range(batch)]
        for key in PAIRS
    }


# --------------------------------------------------------------------------------------------- golden values

S, LS = sigmoid, lambda x: -softplus(-x)  # σ and log σ, to keep the rows below short
A = lambda h: (1 - math.exp(-0.5 * h)) / 0.5  # noqa: E731  α-divergence score (1 - u^{-α})/α at α = 0.5
GOLDEN = [
    # (name, params, expected losses, chosen rewards, rejected rewards), with the arithmetic of each row above it.
    # dpop β=0.1 λ=50: max(0,-h_c) = [0, 1]; z = 0.1·([1, -1.5] - 50·[0, 1]) = [0.1, -5.15]; -log σ(z) = [0.644397, 5.155783]
    ("dpop", {"beta": 0.1, "lambda_": 50.0}, [softplus(-0.1), softplus(5.15)], [0.05, -0.1], [-0.05, 0.05]),
    # nca β=1: r_c = [0.5, -1], r_r = [-0.5, 0.5]; softplus(-r_c) + ½softplus(r_c) + ½softplus(r_r)
    # = [0.474077 + 0.487038 + 0.237038, 1.313262 + 0.156631 + 0.487038] = [1.198154, 1.956931]
    ("nca", {"beta": 1.0}, [softplus(-0.5) + softplus(0.5) / 2 + softplus(-0.5) / 2,
                            softplus(1.0) + softplus(-1.0) / 2 + softplus(0.5) / 2], [0.5, -1.0], [-0.5, 0.5]),
    # exo β=1 ε=0.1: z = [1, -1.5]; σ(z)(log σ(z) - log 0.9) + σ(-z)(log σ(-z) - log 0.1)
    # pair 1: 0.731059·(-0.313262 + 0.105361) + 0.268941·(-1.313262 + 2.302585) = 0.114082; pair 2: 1.426704
    ("exo", {"beta": 1.0, "label_smoothing": 0.1},
     [S(z) * (LS(z) - math.log(0.9)) + S(-z) * (LS(-z) - math.log(0.1)) for z in (1.0, -1.5)],
     [0.5, -1.0], [-0.5, 0.5]),
    # aot β=1: sort(policy margin [1, -1]) = [-1, 1], sort(reference margin [0, 0.5]) = [0, 0.5]; delta = [-1, 0.5];
    # loss = softplus(-delta) = [1.313262, 0.474077] (per quantile, not per pair; DPO's unsorted h_c - h_r differs)
    ("aot", {"beta": 1.0}, [softplus(1.0), softplus(-0.5)], [0.5, -1.0], [-0.5, 0.5]),
    # aot ε=0.2: 0.8·softplus(-delta) + 0.2·softplus(delta) = [1.113262, 0.574077]
    ("aot", {"beta": 1.0, "label_smoothing": 0.2}, [0.8 * softplus(1.0) + 0.2 * softplus(-1.0),
                                                    0.8 * softplus(-0.5) + 0.2 * softplus(0.5)], [0.5, -1.0], [-0.5, 0.5]),
    # aot_unpaired β=1: sort(h_c) = [-1, 0.5], sort(h_r) = [-0.5, 0.5]; delta = [-0.5, 0] → [0.974077, log 2]
    ("aot_unpaired", {"beta": 1.0}, [softplus(0.5), math.log(2)], [0.5, -1.0], [-0.5, 0.5]),
    # apo_zero β=1: 1 - σ(h_c) + σ(h_r) = [1 - 0.622459 + 0.377541, 1 - 0.268941 + 0.622459] = [0.755081, 1.353518]
    ("apo_zero", {"beta": 1.0}, [1 - S(0.5) + S(-0.5), 1 - S(-1.0) + S(0.5)], [0.5, -1.0], [-0.5, 0.5]),
    # apo_down β=1: σ(h_c) + 1 - σ(h_c - h_r) = [0.622459 + 1 - 0.731059, 0.268941 + 1 - 0.182426] = [0.891401, 1.086516]
    ("apo_down", {"beta": 1.0}, [S(0.5) + 1 - S(1.0), S(-1.0) + 1 - S(-1.5)], [0.5, -1.0], [-0.5, 0.5]),
    # discopop β=1 τ=0.5: z = [1, -1.5]; w = σ(z/τ) = [σ(2), σ(-3)] = [0.880797, 0.047426]; (1-w)·softplus(-z) + w·e^{-z}
    # = [0.119203·0.313262 + 0.880797·0.367879, 0.952574·1.701413 + 0.047426·4.481689] = [0.361369, 1.833270]
    ("discopop", {"beta": 1.0, "tau": 0.5}, [(1 - S(z / 0.5)) * softplus(-z) + S(z / 0.5) * math.exp(-z)
                                             for z in (1.0, -1.5)], [0.5, -1.0], [-0.5, 0.5]),
    # sppo_hard β=0.5 → targets ±1/(2β) = ±1: (h_c - 1)² + (h_r + 1)² = [0.25 + 0.25, 4 + 2.25] = [0.5, 6.25]
    ("sppo_hard", {"beta": 0.5}, [0.5, 6.25], [0.25, -0.5], [-0.25, 0.25]),
    # dpo_norm β=1: d = h_c/n_c - h_r/n_r = [0.375, -0.5]; softplus(-d) = [0.523123, 0.974077]; rewards β·h/n
    ("dpo_norm", {"beta": 1.0}, [softplus(-0.375), softplus(0.5)], [0.25, -0.25], [-0.125, 0.25]),
    # slic δ=1 λ=0.1: max(0, 1 - [1, -1]) = [0, 2]; NLL -lp_c/n_c = [0.5, 1.0]; loss = [0.05, 2.1]; rewards lp
    ("slic", {"delta": 1.0, "lambda_": 0.1}, [0.05, 2.1], [-1.0, -4.0], [-2.0, -3.0]),
    # dpo forward_kl β=1: s = 1 - e^{-h}: s_c = [0.393469, -1.718282], s_r = [-0.648721, 0.393469];
    # Δ = [1.042191, -2.111751]; loss softplus(-Δ) = [0.302089, 2.225995]; rewards β·s
    ("dpo", {"beta": 1.0, "f_divergence": "forward_kl"},
     [softplus(-((1 - math.exp(-0.5)) - (1 - math.exp(0.5)))), softplus(-((1 - math.exp(1.0)) - (1 - math.exp(-0.5))))],
     [1 - math.exp(-0.5), 1 - math.exp(1.0)], [1 - math.exp(0.5), 1 - math.exp(-0.5)]),
    # dpo js_divergence β=1: s = log 2 + log σ(h); Δ = log σ(h_c) - log σ(h_r) = [0.5, -1.313262 + 0.474077]
    # = [0.5, -0.839185]; loss = [0.474077, 1.198301]; s_c = [0.219070, -0.620115], s_r = [-0.280930, 0.219070]
    ("dpo", {"beta": 1.0, "f_divergence": "js_divergence"}, [softplus(-0.5), softplus(-(LS(-1.0) - LS(0.5)))],
     [math.log(2) + LS(0.5), math.log(2) + LS(-1.0)], [math.log(2) + LS(-0.5), math.log(2) + LS(0.5)]),
    # dpo alpha_divergence α=0.5 β=1: s = (1 - e^{-h/2})/0.5: s_c = [0.442398, -1.297443], s_r = [-0.568051, 0.442398];
    # Δ = [1.010449, -1.739841]; loss = [0.310462, 1.901576]
    ("dpo", {"beta": 1.0, "f_divergence": "alpha_divergence", "f_alpha": 0.5},
     [softplus(-(A(0.5) - A(-0.5))), softplus(-(A(-1.0) - A(0.5)))], [A(0.5), A(-1.0)], [A(-0.5), A(0.5)]),
]


@pytest.mark.parametrize("name, params, losses, chosen, rejected", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden(name, params, losses, chosen, rejected):
    """Expected values are ``math`` expressions of the arithmetic written above each row of GOLDEN."""
    out = preference_loss(name, **tensors(PAIRS, reference=name != "slic"), **params)
    assert_values(out.losses, losses)
    assert_values(out.chosen_rewards, chosen)
    assert_values(out.rejected_rewards, rejected)


def test_dpop_gradient_and_metric():
    """d loss / d lp_c = -β(1 + λ·1[h_c < 0])·σ(-z): pair 1 (h_c > 0) -0.1·σ(-0.1) = -0.047502;
    pair 2 (h_c < 0, z = -5.15) -0.1·51·σ(5.15) = -5.070594. Metric dpop_penalty = mean [0, 1] = 0.5."""
    inputs = tensors(PAIRS)
    chosen = inputs["policy_chosen_logps"].requires_grad_(True)
    out = preference_loss("dpop", **inputs, beta=0.1, lambda_=50.0)
    out.losses.sum().backward()
    assert_values(chosen.grad, [-0.1 * sigmoid(-0.1), -0.1 * 51 * sigmoid(5.15)])
    assert out.metrics["dpop_penalty"].item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "loss, expected",
    [  # β = 2: ρ = 2·[1, -1.5] = [2, -3]
        ("logistic", [softplus(-2.0), softplus(3.0)]),  # [0.126928, 3.048587]
        ("hinge", [0.0, 4.0]),  # max(0, 1 - ρ)
        ("squared", [1.0, 16.0]),  # (ρ - 1)²
        ("exponential", [math.exp(-2.0), math.exp(3.0)]),  # [0.135335, 20.085537]
        ("truncated_squared", [0.0, 16.0]),  # max(0, 1 - ρ)²
        ("savage", [sigmoid(-2.0) ** 2, sigmoid(3.0) ** 2]),  # 1/(1 + e^ρ)² = [0.014209, 0.907397]
    ],
)
def test_gpo_golden(loss, expected):
    out = preference_loss("gpo", **tensors(PAIRS), beta=2.0, loss=loss)
    assert_values(out.losses, expected, tol=1e-5)
    assert_values(out.chosen_rewards, [1.0, -2.0])


def one_pair(chosen: torch.Tensor, others: float) -> dict:
    """A batch of one pair with policy chosen log-prob ``chosen`` (1,) and every other log-prob ``others``."""
    rest = torch.full((1,), others, dtype=chosen.dtype)
    one = torch.ones(1, dtype=torch.long)
    return {"policy_chosen_logps": chosen, "chosen_tokens": one, "policy_rejected_logps": rest,
            "rejected_tokens": one, "reference_chosen_logps": rest, "reference_rejected_logps": rest}


def test_exo_is_zero_at_the_smoothed_target():
    """KL(p ‖ p_rh) = 0 exactly when σ(z) = 1 - ε, i.e. z = log((1-ε)/ε); ε = 0.1, β = 1 → h_c - h_r = log 9."""
    chosen = torch.tensor([math.log(9.0) - 2], dtype=torch.float64, requires_grad=True)
    out = preference_loss("exo", **one_pair(chosen, -2.0), beta=1.0, label_smoothing=0.1)
    out.losses.sum().backward()
    assert out.losses.item() == pytest.approx(0.0, abs=1e-12)
    assert chosen.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_discopop_is_finite_where_the_naive_formula_is_nan():
    """z = β·ρ = -200 (β = 1): TRL's e^{-z}·σ(z/τ) is inf·0 = NaN in fp32; the loss is softplus(200)·1 + e^{-3800}
    ≈ 200 and d loss / d lp_c ≈ -1 (the logistic branch: -σ(-z))."""
    chosen = torch.tensor([-210.0], requires_grad=True)
    out = preference_loss("discopop", **one_pair(chosen, -10.0), beta=1.0)
    out.losses.sum().backward()
    assert out.losses.item() == pytest.approx(200.0)
    assert chosen.grad.item() == pytest.approx(-1.0, abs=1e-4)


def test_slic_gradient():
    """Pair 1 is past the margin: only the NLL term, -λ/n_c = -0.05; pair 2 is active: -1 - 0.1/4 = -1.025."""
    inputs = tensors(PAIRS, reference=False)
    chosen = inputs["policy_chosen_logps"].requires_grad_(True)
    preference_loss("slic", **inputs).losses.sum().backward()
    assert_values(chosen.grad, [-0.05, -1.025])


# ------------------------------------------------------------------------------------- special-case identities


def _same(a, b, **kwargs) -> None:
    torch.testing.assert_close(a.losses, b.losses, **kwargs)
    torch.testing.assert_close(a.chosen_rewards, b.chosen_rewards, **kwargs)
    torch.testing.assert_close(a.rejected_rewards, b.rejected_rewards, **kwargs)


@pytest.mark.parametrize("seed", [0, 1])
def test_gpo_special_cases(seed):
    """GPO logistic ≡ DPO, GPO hinge ≡ ``hinge`` (SLiC on log-ratios), DPOP with λ = 0 ≡ DPO, and IPO on
    un-averaged log-ratios (token counts 1) is a rescaled GPO squared: with d = h_c - h_r and β = 2τ,
    (d - 1/(2τ))² = (1/(2τ))²·(2τ·d - 1)² = (1/(2τ))²·squared(β·d)."""
    inputs = tensors(random_pairs(seed), dtype=torch.float64)
    _same(preference_loss("gpo", **inputs, beta=0.3, loss="logistic"), preference_loss("dpo", **inputs, beta=0.3))
    _same(preference_loss("gpo", **inputs, beta=0.05, loss="hinge"), preference_loss("hinge", **inputs, beta=0.05))
    _same(preference_loss("dpop", **inputs, beta=0.3, lambda_=0.0), preference_loss("dpo", **inputs, beta=0.3))
    ones = tensors(random_pairs(seed, ones=True), dtype=torch.float64)
    tau = 0.1
    ipo = preference_loss("ipo", **ones, beta=tau)
    squared = preference_loss("gpo", **ones, beta=2 * tau, loss="squared")
    torch.testing.assert_close(ipo.losses, squared.losses / (2 * tau) ** 2)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_single_pair_is_dpo(name):
    """With B = 1 sorting does nothing: paired (lp_c - lp_r) - (ref_c - ref_r) = h_c - h_r, unpaired h_c - h_r."""
    for seed in range(4):
        inputs = tensors(random_pairs(seed, batch=1), dtype=torch.float64)
        _same(preference_loss(name, **inputs, beta=0.2), preference_loss("dpo", **inputs, beta=0.2))


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_is_permutation_invariant_and_equivariant(name):
    """Shuffling the pairs leaves the sorted losses unchanged and shuffles the gradients with the pairs."""
    inputs = tensors(random_pairs(5, batch=8), dtype=torch.float64)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    grads = []
    for order in (torch.arange(8), perm):
        shuffled = {k: v[order].clone() for k, v in inputs.items()}
        shuffled["policy_chosen_logps"].requires_grad_(True)
        out = preference_loss(name, **shuffled, beta=0.1)
        out.losses.sum().backward()
        grads.append((out.losses.detach(), shuffled["policy_chosen_logps"].grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1][perm], grads[1][1])


def test_f_divergence_limits():
    """α-divergence → reverse KL as α → 0 and → forward KL as α → 1 (Wang et al. 2023, Table 1); reverse_kl
    named explicitly is plain DPO."""
    inputs = tensors(random_pairs(2), dtype=torch.float64)
    dpo = preference_loss("dpo", **inputs, beta=0.1)
    _same(preference_loss("dpo", **inputs, beta=0.1, f_divergence="reverse_kl"), dpo, rtol=0, atol=0)
    near_zero = preference_loss("dpo", **inputs, beta=0.1, f_divergence="alpha_divergence", f_alpha=1e-7)
    _same(near_zero, dpo, rtol=1e-4, atol=1e-4)
    forward = preference_loss("dpo", **inputs, beta=0.1, f_divergence="forward_kl")
    near_one = preference_loss("dpo", **inputs, beta=0.1, f_divergence="alpha_divergence", f_alpha=1 - 1e-7)
    _same(near_one, forward, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.7])
def test_f_alpha_is_one_minus_trl_coefficient(alpha):
    """TRL 1.16 scores u = π/π_ref with (u^{c-1} - 1)/(c - 1), c = f_alpha_divergence_coef; the paper's
    (1 - u^{-α})/α is that with c = 1 - α (TRL < 1.0 used (u_l^{-α} - u_w^{-α})/α, the paper's form)."""
    pairs = random_pairs(4)
    out = preference_loss("dpo", **tensors(pairs, dtype=torch.float64), beta=0.1, f_divergence="alpha_divergence",
                          f_alpha=alpha)
    c, expected = 1 - alpha, []
    for i in range(16):
        h_c = pairs["policy_chosen_logps"][i] - pairs["reference_chosen_logps"][i]
        h_r = pairs["policy_rejected_logps"][i] - pairs["reference_rejected_logps"][i]
        score_c, score_r = (math.exp((c - 1) * h_c) - 1) / (c - 1), (math.exp((c - 1) * h_r) - 1) / (c - 1)
        expected.append(softplus(-0.1 * (score_c - score_r)))
    assert_values(out.losses, expected, tol=1e-9)


# ------------------------------------------------------------------------------------ second implementation


def _sorted_logistic(dominant: list[float], dominated: list[float], q: dict) -> list[float]:
    """Smoothed logistic loss on differences of order statistics (TRL "aot" / "aot_unpaired")."""
    eps = q.get("label_smoothing", 0.0)
    return [(1 - eps) * softplus(-q["beta"] * (a - b)) + eps * softplus(q["beta"] * (a - b))
            for a, b in zip(sorted(dominant), sorted(dominated), strict=True)]


def _f_score(h: float, q: dict) -> float:
    """f'(π/π_ref) of TRL's f_divergence_type branches, shifted to f'(1) = 0; α in the paper's form."""
    alpha = q.get("f_alpha", 0.5)
    return {"forward_kl": 1 - math.exp(-h), "js_divergence": math.log(2) - softplus(-h),
            "alpha_divergence": (1 - math.exp(-alpha * h)) / alpha}[q["f_divergence"]]


# One example: x holds h_c, h_r (summed log-ratios), lp_c, lp_r, n_c, n_r; q the parameters. Returns the loss.
PER_PAIR = {
    "dpop": lambda x, q: softplus(-q["beta"] * (x["h_c"] - x["h_r"] - q["lambda_"] * max(0.0, -x["h_c"]))),
    "gpo": lambda x, q: {  # Tang et al. 2024, Table 1, at ρ = β(h_c - h_r)
        "logistic": lambda r: softplus(-r), "hinge": lambda r: max(0.0, 1 - r), "squared": lambda r: (r - 1) ** 2,
        "exponential": lambda r: math.exp(-r), "truncated_squared": lambda r: max(0.0, 1 - r) ** 2,
        "savage": lambda r: 1 / (1 + math.exp(r)) ** 2,
    }[q["loss"]](q["beta"] * (x["h_c"] - x["h_r"])),
    "nca": lambda x, q: (  # TRL "nca_pair"
        softplus(-q["beta"] * x["h_c"]) + 0.5 * softplus(q["beta"] * x["h_c"]) + 0.5 * softplus(q["beta"] * x["h_r"])),
    "exo": lambda x, q: (  # TRL "exo_pair": Σ q_i (log q_i - log p_i), q = (σ(z), σ(-z)), p = (1-ε, ε)
        sigmoid(x["z"]) * (-softplus(-x["z"]) - math.log(1 - q["label_smoothing"]))
        + sigmoid(-x["z"]) * (-softplus(x["z"]) - math.log(q["label_smoothing"]))),
    "apo_zero": lambda x, q: 1 - sigmoid(q["beta"] * x["h_c"]) + sigmoid(q["beta"] * x["h_r"]),  # TRL "apo_zero"
    "apo_down": lambda x, q: sigmoid(q["beta"] * x["h_c"]) + 1 - sigmoid(x["z"]),  # TRL "apo_down"
    "discopop": lambda x, q: (  # TRL "discopop": logistic·(1 - σ(z/τ)) + e^{-z}·σ(z/τ)
        softplus(-x["z"]) * (1 - sigmoid(x["z"] / q["tau"])) + math.exp(-x["z"]) * sigmoid(x["z"] / q["tau"])),
    "sppo_hard": lambda x, q: (x["h_c"] - 0.5 / q["beta"]) ** 2 + (x["h_r"] + 0.5 / q["beta"]) ** 2,  # TRL
    "dpo_norm": lambda x, q: softplus(-q["beta"] * (x["h_c"] / x["n_c"] - x["h_r"] / x["n_r"])),  # "sigmoid_norm"
    "dpo": lambda x, q: (  # TRL "sigmoid" on f_divergence_type scores, with label smoothing
        (1 - q.get("label_smoothing", 0.0)) * softplus(-q["beta"] * (_f_score(x["h_c"], q) - _f_score(x["h_r"], q)))
        + q.get("label_smoothing", 0.0) * softplus(q["beta"] * (_f_score(x["h_c"], q) - _f_score(x["h_r"], q)))),
    "slic": lambda x, q: (  # Zhao et al. 2023, Eq. 2, the chosen completion's mean NLL as regulariser
        max(0.0, q["delta"] - x["lp_c"] + x["lp_r"]) + q["lambda_"] * (-x["lp_c"] / x["n_c"])),
}
REWARDS = {  # (chosen, rejected) rewards where they are not β·h
    "dpo_norm": lambda x, q: (q["beta"] * x["h_c"] / x["n_c"], q["beta"] * x["h_r"] / x["n_r"]),
    "dpo": lambda x, q: (q["beta"] * _f_score(x["h_c"], q), q["beta"] * _f_score(x["h_r"], q)),
    "slic": lambda x, q: (x["lp_c"], x["lp_r"]),
}


def reference_losses(name: str, p: dict, q: dict) -> tuple[list[float], list[float], list[float]]:
    """Losses and rewards in plain Python: per example, or on the sorted batch for the two AOT objectives."""
    rows = [
        {"lp_c": lp_c, "lp_r": lp_r, "n_c": n_c, "n_r": n_r, "ref_c": ref_c, "ref_r": ref_r,
         "h_c": lp_c - ref_c, "h_r": lp_r - ref_r, "z": q.get("beta", 0.0) * ((lp_c - ref_c) - (lp_r - ref_r))}
        for lp_c, lp_r, n_c, n_r, ref_c, ref_r in zip(
            p["policy_chosen_logps"], p["policy_rejected_logps"], p["chosen_tokens"], p["rejected_tokens"],
            p["reference_chosen_logps"], p["reference_rejected_logps"], strict=True)
    ]
    rewards = [REWARDS.get(name, lambda x, q: (q["beta"] * x["h_c"], q["beta"] * x["h_r"]))(x, q) for x in rows]
    if name == "aot":  # TRL "aot": policy margins and reference margins sorted separately
        losses = _sorted_logistic([x["lp_c"] - x["lp_r"] for x in rows], [x["ref_c"] - x["ref_r"] for x in rows], q)
    elif name == "aot_unpaired":  # TRL "aot_unpaired": chosen and rejected log-ratios sorted separately
        losses = _sorted_logistic([x["h_c"] for x in rows], [x["h_r"] for x in rows], q)
    else:
        losses = [PER_PAIR[name](x, q) for x in rows]
    return losses, [r[0] for r in rewards], [r[1] for r in rewards]


SECOND = [
    ("dpop", {"beta": 0.1, "lambda_": 50.0}), ("dpop", {"beta": 0.5, "lambda_": 5.0}),
    *[("gpo", {"beta": 0.1, "loss": f}) for f in
      ("logistic", "hinge", "squared", "exponential", "truncated_squared", "savage")],
    ("nca", {"beta": 0.1}),
    ("exo", {"beta": 0.1, "label_smoothing": 1e-3}), ("exo", {"beta": 0.3, "label_smoothing": 0.2}),
    ("aot", {"beta": 0.1, "label_smoothing": 0.0}), ("aot", {"beta": 0.2, "label_smoothing": 0.1}),
    ("aot_unpaired", {"beta": 0.1, "label_smoothing": 0.0}), ("aot_unpaired", {"beta": 0.2, "label_smoothing": 0.1}),
    ("apo_zero", {"beta": 0.1}), ("apo_down", {"beta": 0.1}),
    ("discopop", {"beta": 0.1, "tau": 0.05}), ("discopop", {"beta": 0.05, "tau": 0.5}),
    ("sppo_hard", {"beta": 0.1}), ("dpo_norm", {"beta": 2.0}),
    ("dpo", {"beta": 0.1, "label_smoothing": 0.0, "f_divergence": "forward_kl"}),
    ("dpo", {"beta": 0.1, "label_smoothing": 0.2, "f_divergence": "js_divergence"}),
    ("dpo", {"beta": 0.1, "label_smoothing": 0.0, "f_divergence": "alpha_divergence", "f_alpha": 0.3}),
    ("slic", {"delta": 1.0, "lambda_": 0.1}), ("slic", {"delta": 5.0, "lambda_": 1.0}),
]


@pytest.mark.parametrize("name, params", SECOND, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SECOND)])
def test_matches_second_implementation(name, params):
    """Random inputs (seed 0 and 1, B = 16) against ``reference_losses``; float64 so the tolerance is tight."""
    for seed in (0, 1):
        pairs = random_pairs(seed)
        losses, chosen, rejected = reference_losses(name, pairs, params)
        out = preference_loss(name, **tensors(pairs, reference=name != "slic", dtype=torch.float64), **params)
        assert_values(out.losses, losses, tol=1e-9)
        assert_values(out.chosen_rewards, chosen, tol=1e-9)
        assert_values(out.rejected_rewards, rejected, tol=1e-9)


# ------------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "name, values, message",
    [
        ("dpop", {"lambda_": -1.0}, r"lambda_ must be >= 0"),
        ("gpo", {"loss": "sigmoid"}, r"unknown GPO loss 'sigmoid'; valid: logistic, hinge, squared, exponential, "
                                     r"truncated_squared, savage"),
        ("exo", {"label_smoothing": 0.0}, r"EXO needs label_smoothing > 0"),
        ("exo", {"label_smoothing": 1.0}, r"EXO needs label_smoothing > 0 \(and < 1\)"),
        ("aot", {"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ("discopop", {"tau": 0.0}, r"tau must be > 0"),
        ("sppo_hard", {"beta": 0.0}, r"beta must be > 0"),
        ("slic", {"delta": -1.0}, r"delta must be >= 0"),
        ("slic", {"lambda_": -0.5}, r"lambda_ must be >= 0"),
        # SLiC-HF has no β (its margin δ is in nats of summed log-likelihood): passing one is an error
        ("slic", {"beta": 0.1}, r"does not take parameter\(s\) beta; its parameters are: delta, lambda_"),
        ("dpo", {"f_divergence": "kl"}, r"unknown f_divergence 'kl'; valid: reverse_kl, forward_kl, js_divergence"),
        ("dpo", {"f_alpha": 1.0}, r"f_alpha must be in \(0, 1\)"),
        ("dpo", {"f_alpha": 0.0}, r"f_alpha must be in \(0, 1\)"),
    ],
)
def test_bad_parameter_values(name, values, message):
    with pytest.raises(ValueError, match=message):
        make_params(name, values)
