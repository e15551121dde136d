"""TDPO, the paired modifiers (WPO, LD-DPO) and objective mixtures: golden values written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.objectives import PairedLogps, preference_loss
from preftune.objectives.modifiers import length_desensitized, wpo_weights
from preftune.objectives.plan import build_plan


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def token_pairs() -> dict:
    """One pair: chosen has 2 tokens with log-probs [-1, -2], rejected 3 tokens [-1, -1, -3]; the reference
    gives chosen [-1.5, -2] and rejected [-1, -0.5, -2]. Sums: π_c = -3, π_r = -5, ref_c = -3.5, ref_r = -3.5."""
    mask_c = torch.tensor([[True, True, False]])
    mask_r = torch.tensor([[True, True, True]])
    return dict(
        policy_chosen_logps=t(-3.0), policy_rejected_logps=t(-5.0), chosen_tokens=torch.tensor([2]),
        rejected_tokens=torch.tensor([3]), reference_chosen_logps=t(-3.5), reference_rejected_logps=t(-3.5),
        chosen_token_mask=mask_c, rejected_token_mask=mask_r,
        policy_chosen_token_logps=t([-1.0, -2.0, 0.0]), policy_rejected_token_logps=t([-1.0, -1.0, -3.0]),
        reference_chosen_token_logps=t([-1.5, -2.0, 0.0]), reference_rejected_token_logps=t([-1.0, -0.5, -2.0]),
        chosen_token_kl=t([0.1, 0.2, 0.0]), rejected_token_kl=t([0.3, 0.0, 0.4]),
        chosen_token_log_sum_sq=t([-0.5, -1.0, 0.0]), rejected_token_log_sum_sq=t([-0.5, -0.5, -1.0]),
    )


def test_tdpo1_and_tdpo2_golden():
    """h_c = -3 - (-3.5) = 0.5, h_r = -5 - (-3.5) = -1.5, u = h_c - h_r = 2.0; D_SeqKL: chosen 0.1 + 0.2 = 0.3,
    rejected 0.3 + 0 + 0.4 = 0.7. TDPO1: β(u - (0.7 - 0.3)) = 0.1·1.6 = 0.16 → loss softplus(-0.16);
    TDPO2 (α = 0.5): β(u - 0.5·0.4) = 0.1·1.8 = 0.18 → softplus(-0.18). Rewards: β(h + KL) = [0.08], [-0.08]."""
    one = preference_loss("tdpo", **token_pairs(), beta=0.1, version=1)
    two = preference_loss("tdpo", **token_pairs(), beta=0.1, alpha=0.5, version=2)
    assert one.losses.item() == pytest.approx(softplus(-0.16), abs=1e-9)
    assert two.losses.item() == pytest.approx(softplus(-0.18), abs=1e-9)
    assert two.chosen_rewards.item() == pytest.approx(0.1 * (0.5 + 0.3))
    assert two.rejected_rewards.item() == pytest.approx(0.1 * (-1.5 + 0.7))


def test_tdpo2_stops_the_gradient_of_the_chosen_kl():
    """TDPO2's chosen KL is under stop-gradient: d loss / d KL_c = 0, while TDPO1's is -β·σ(-z)·(-1)·... ≠ 0."""
    for version, expect_zero in ((2, True), (1, False)):
        inputs = token_pairs()
        kl = inputs["chosen_token_kl"].clone().requires_grad_(True)
        inputs["chosen_token_kl"] = kl
        inputs["policy_chosen_logps"] = inputs["policy_chosen_logps"].clone().requires_grad_(True)
        preference_loss("tdpo", **inputs, beta=0.1, version=version).losses.sum().backward()
        assert (kl.grad is None or kl.grad.abs().sum().item() == 0) == expect_zero


def test_ld_dpo_reweights_the_tokens_past_the_shorter_completion():
    """l_p = min(2, 3) = 2. With α = 0.5: π̂_c = -1 - 2 = -3 (no tail), π̂_r = (-1 - 1) + 0.5·(-3) = -3.5,
    ref̂_c = -3.5, ref̂_r = (-1 - 0.5) + 0.5·(-2) = -2.5. DPO logits = 0.1·((-3 + 3.5) - (-3.5 + 2.5)) = 0.15."""
    logps = PairedLogps(**token_pairs())
    ld = length_desensitized(logps, 0.5)
    assert ld.policy_rejected_logps.item() == pytest.approx(-3.5)
    assert ld.reference_rejected_logps.item() == pytest.approx(-2.5)
    assert ld.policy_chosen_logps.item() == pytest.approx(-3.0)
    plan = build_plan("dpo", {"beta": 0.1}, ld_alpha=0.5)
    assert plan.compute(logps).losses.item() == pytest.approx(softplus(-0.15), abs=1e-9)
    unchanged = build_plan("dpo", {"beta": 0.1}, ld_alpha=1.0).compute(logps)  # α = 1 is plain DPO
    assert unchanged.losses.item() == pytest.approx(softplus(-0.1 * (0.5 + 1.5)), abs=1e-9)


def test_wpo_weights_golden():
    """w̄_c = mean(-1 + 0.5, -2 + 1) = mean(-0.5, -1) = -0.75; w̄_r = mean(-0.5, -0.5, -2) = -1.0;
    w = min(1, e^{-1.75}) = 0.173774; the DPO loss softplus(-0.2) is multiplied by it."""
    logps = PairedLogps(**token_pairs())
    weight = wpo_weights(logps)
    assert weight.item() == pytest.approx(math.exp(-1.75), abs=1e-9)
    loss = build_plan("dpo", {"beta": 0.1}, wpo=True).compute(logps).losses.item()
    assert loss == pytest.approx(math.exp(-1.75) * softplus(-0.1 * 2.0), abs=1e-9)
    assert not wpo_weights(logps).requires_grad


def test_mixture_is_the_weighted_sum_with_the_primary_rewards():
    """0.8·DPO + 0.5·SFT on the pair above: DPO = softplus(-0.2), SFT = -(-3)/2 = 1.5 → 0.8·0.598139 + 0.75;
    rewards stay the primary's (β·h_c = 0.05)."""
    plan = build_plan("dpo", {"beta": 0.1}, weight=0.8, mixture=[{"name": "sft", "weight": 0.5}])
    out = plan.compute(PairedLogps(**token_pairs()))
    assert out.losses.item() == pytest.approx(0.8 * softplus(-0.2) + 0.75, abs=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(0.05)
    assert out.metrics["sft/loss"].item() == pytest.approx(1.5)
    assert plan.needs_reference and plan.name == "dpo+sft"


def test_mixture_and_modifier_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"common data shape: dpo \(pairs\), kto \(unpaired\)"):
        build_plan("dpo", {}, mixture=[{"name": "kto"}])
    with pytest.raises(ValueError, match=r"mixture\[0\] must be a mapping with a 'name'"):
        build_plan("dpo", {}, mixture=[{"weight": 1}])
    with pytest.raises(ValueError, match="ld_alpha must be in"):
        build_plan("dpo", {}, ld_alpha=1.5).compute(PairedLogps(**token_pairs()))
    with pytest.raises(ValueError, match="ld_alpha and wpo weigh a chosen against a rejected completion; 'kto'"):
        build_plan("kto", {}, wpo=True)
    with pytest.raises(ValueError, match="'sft' does not compare two completions"):
        build_plan("sft", {}, ld_alpha=0.5)
    assert build_plan("dpo", {}, ld_alpha=0.5).needs_live_reference
    assert not build_plan("dpo", {}, wpo=True).needs_live_reference  # WPO looks at the policy only
