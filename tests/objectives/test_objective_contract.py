"""One contract test run over every row of ``OBJECTIVES``: a new objective is covered as soon as it is listed.

It checks what the trainer relies on without knowing any objective's name: shapes, detached rewards, 0-d
metrics, finite gradients, fp32-or-better results from bf16 inputs, boundary errors that name the field or
list the valid choices, and the declared traits (``needs_reference``, ``uses_rejected``, ``paper``).
Objectives on pairs/completions get PairedLogps; the others get GroupLogps built from their traits by
``group_inputs`` (slot count by data shape, the fields in ``requires``). Stateful objectives are called twice,
the second time with the state the first returned.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from preftune.objectives import (
    OBJECTIVES,
    GroupLogps,
    get_objective,
    make_params,
    param_names,
    preference_loss,
    takes_groups,
)

BATCH = 4
POLICY_FIELDS = ("policy_chosen_logps", "policy_rejected_logps")
REFERENCE_FIELDS = ("reference_chosen_logps", "reference_rejected_logps")


def random_inputs(seed: int = 0, reference: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    """Valid (B,) tensors: summed log-probs in [-50, -1], token counts in [1, 40]."""
    gen = torch.Generator().manual_seed(seed)

    def logps() -> torch.Tensor:
        return (-1 - 49 * torch.rand(BATCH, generator=gen, dtype=torch.float64)).to(dtype)

    inputs = {
        "policy_chosen_logps": logps(),
        "chosen_tokens": torch.randint(1, 41, (BATCH,), generator=gen),
        "policy_rejected_logps": logps(),
        "rejected_tokens": torch.randint(1, 41, (BATCH,), generator=gen),
    }
    if reference:
        inputs.update(reference_chosen_logps=logps(), reference_rejected_logps=logps())
    inputs.update(_token_inputs(gen, reference, dtype))
    return inputs


def _token_inputs(gen: torch.Generator, reference: bool, dtype: torch.dtype, width: int = 6) -> dict:
    """(B, T) per-token fields for token-level objectives and modifiers: log-probs, masks, KL >= 0, log Σp²."""
    fields = {}
    for side in ("chosen", "rejected"):
        lengths = torch.randint(1, width + 1, (BATCH,), generator=gen)
        mask = torch.arange(width)[None, :] < lengths[:, None]

        def token(mask=mask):
            return ((-0.1 - 4 * torch.rand(BATCH, width, generator=gen, dtype=torch.float64)) * mask).to(dtype)

        fields[f"{side}_token_mask"] = mask
        fields[f"policy_{side}_token_logps"] = token()
        fields[f"{side}_token_kl"] = (torch.rand(BATCH, width, generator=gen, dtype=torch.float64) * mask).to(dtype)
        fields[f"{side}_token_log_sum_sq"] = token()
        if reference:
            fields[f"reference_{side}_token_logps"] = token()
    return fields


def _check_outputs(name: str, inputs: dict) -> None:
    policy = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k in POLICY_FIELDS}
    out = preference_loss(name, **{**inputs, **policy})
    assert out.losses.shape == (BATCH,)
    assert torch.isfinite(out.losses).all()
    for rewards in (out.chosen_rewards, out.rejected_rewards):
        assert rewards.shape == (BATCH,)
        assert not rewards.requires_grad, "rewards must be detached"
        assert torch.isfinite(rewards).all()
    for key, value in out.metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, f"metric {key} must be a 0-d tensor"
        assert not value.requires_grad, f"metric {key} must be detached"
    out.losses.sum().backward()
    assert policy["policy_chosen_logps"].grad is not None
    assert torch.isfinite(policy["policy_chosen_logps"].grad).all()
    rejected_grad = policy["policy_rejected_logps"].grad
    if get_objective(name).uses_rejected:
        assert rejected_grad is not None and torch.isfinite(rejected_grad).all()
    else:  # declared not to use it: the trainer may skip the rejected forward
        assert rejected_grad is None or not rejected_grad.any()
    for key in REFERENCE_FIELDS:  # the reference is frozen: nothing may need its gradient
        assert key not in inputs or inputs[key].grad is None


def _check_bf16(name: str, needs_reference: bool) -> None:
    out = preference_loss(name, **random_inputs(1, reference=needs_reference, dtype=torch.bfloat16))
    for tensor in (out.losses, out.chosen_rewards, out.rejected_rewards):
        assert tensor.dtype in (torch.float32, torch.float64), f"{name} computed in {tensor.dtype}"
        assert torch.isfinite(tensor).all()


def _check_boundary_errors(name: str, inputs: dict, needs_reference: bool) -> None:
    for key, value in inputs.items():
        for bad in (value[:-1], value.unsqueeze(1)):
            with pytest.raises(ValueError, match=key):
                preference_loss(name, **{**inputs, key: bad})
    if needs_reference:
        without = {k: v for k, v in inputs.items() if k not in REFERENCE_FIELDS}
        with pytest.raises(ValueError, match="reference_chosen_logps"):
            preference_loss(name, **without)
    if get_objective(name).uses_rejected:
        without = {k: v for k, v in inputs.items() if k not in ("policy_rejected_logps", "rejected_tokens")}
        with pytest.raises(ValueError, match="policy_rejected_logps"):
            preference_loss(name, **without)
    with pytest.raises(ValueError, match="not_a_parameter") as info:
        preference_loss(name, **inputs, not_a_parameter=1.0)
    for valid in param_names(get_objective(name)):
        assert valid in str(info.value), f"the error should list {valid}: {info.value}"


def _check_declaration(name: str) -> None:
    objective = get_objective(name)
    assert objective.name == name
    assert objective.paper.strip(), f"{name} must cite its paper"
    if takes_groups(objective):
        assert set(objective.shapes) <= set(GROUP_SLOTS), f"{name}: unknown data shape in {objective.shapes}"
        assert set(objective.requires) <= GROUP_FIELDS, f"{name}: requires fields GroupLogps does not have"
        assert objective.needs_value == ("values" in objective.requires)
    else:
        assert set(objective.shapes) <= {"pairs", "completions"}
        assert not objective.requires, "requires lists GroupLogps fields; paired objectives take PairedLogps"
    assert dataclasses.is_dataclass(objective.params)
    for f in dataclasses.fields(objective.params):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        assert has_default, f"{name}: parameter {f.name} needs a default"
    assert make_params(name, {}) == objective.params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        objective.params().__setattr__("beta", 1.0)


def _check_reference_free(name: str) -> None:
    """A reference-free objective must give the same loss whether or not reference tensors are passed."""
    with_ref = preference_loss(name, **random_inputs(2, reference=True))
    without_ref = preference_loss(name, **random_inputs(2, reference=False))
    torch.testing.assert_close(with_ref.losses, without_ref.losses, rtol=0, atol=0)
    torch.testing.assert_close(with_ref.chosen_rewards, without_ref.chosen_rewards, rtol=0, atol=0)


def _check_completions_only(name: str) -> None:
    inputs = random_inputs(3, reference=False)
    inputs = {k: v for k, v in inputs.items() if k in ("policy_chosen_logps", "chosen_tokens")}
    out = preference_loss(name, **inputs)
    assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (BATCH,)
    assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize("name", sorted(n for n, o in OBJECTIVES.items() if not takes_groups(o)))
def test_objective_contract(name):
    objective = get_objective(name)
    inputs = random_inputs(0, reference=objective.needs_reference)
    _check_declaration(name)
    _check_outputs(name, inputs)
    _check_bf16(name, objective.needs_reference)
    _check_boundary_errors(name, inputs, objective.needs_reference)
    _check_state(name, inputs, random_inputs(5, reference=objective.needs_reference))
    if not objective.needs_reference:
        _check_reference_free(name)
    if "completions" in objective.shapes:
        _check_completions_only(name)


# ------------------------------------------------------------------------- objectives on other data shapes

# Completion slots per example by data shape: unpaired/scored/negatives [completion]; ranked [best..worst];
# negatives_with_samples [rejected, sample_1..sample_K].
GROUP_SLOTS = {"unpaired": 1, "scored": 1, "negatives": 1, "ranked": 4, "negatives_with_samples": 4}
GROUP_FIELDS = {f.name for f in dataclasses.fields(GroupLogps)} - {"policy_logps", "tokens", "mask", "state"}


def group_inputs(name: str, seed: int = 0, reference: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    """Valid GroupLogps tensors for objective ``name``: (B, K) log-probs in [-50, -1], K from its data shape.

    Lists longer than one completion get a ragged last example (its last slot absent: log-prob 0, token count 1,
    as the collator pads), so every objective on lists is checked with a mask. ``requires`` fields are added:
    labels alternate True/False, scores U(0, 1) (win probabilities for SPPO, any score for DRO), values N(0, 1), the mismatched-pair log-probs like the others.
    """
    objective = get_objective(name)
    slots = GROUP_SLOTS[objective.shapes[0]]
    gen = torch.Generator().manual_seed(seed)

    def logps(*shape: int) -> torch.Tensor:
        return (-1 - 49 * torch.rand(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    mask = torch.ones(BATCH, slots, dtype=torch.bool)
    if slots > 2:
        mask[-1, -1] = False
    inputs = {
        "policy_logps": logps(BATCH, slots).masked_fill(~mask, 0.0),
        "tokens": torch.randint(1, 41, (BATCH, slots), generator=gen).masked_fill(~mask, 1),
        "mask": mask,
    }
    if reference:
        inputs["reference_logps"] = logps(BATCH, slots).masked_fill(~mask, 0.0)
    for key in objective.requires:
        if key == "labels":
            inputs[key] = torch.arange(BATCH) % 2 == 0
        elif key == "scores":
            inputs[key] = torch.rand(BATCH, slots, generator=gen, dtype=torch.float64).to(dtype)
        elif key == "values":
            inputs[key] = torch.randn(BATCH, generator=gen, dtype=torch.float64).to(dtype)
        else:  # policy_kl_logps, reference_kl_logps
            inputs[key] = logps(BATCH)
    return inputs


def _check_group_outputs(name: str, inputs: dict) -> None:
    objective = get_objective(name)
    trainable = ["policy_logps"] + (["values"] if objective.needs_value else [])
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in trainable}
    out = preference_loss(name, **{**inputs, **leaves})
    assert out.losses.shape == (BATCH,)
    assert torch.isfinite(out.losses).all()
    for rewards in (out.chosen_rewards, out.rejected_rewards):
        assert rewards.shape == (BATCH,)
        assert not rewards.requires_grad, "rewards must be detached"
        assert not torch.isinf(rewards).any(), "rewards are finite, or NaN where an example has none"
    assert (~out.chosen_rewards.isnan() | ~out.rejected_rewards.isnan()).all(), "every example has a reward"
    for key, value in out.metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, f"metric {key} must be a 0-d tensor"
        assert not value.requires_grad, f"metric {key} must be detached"
    out.losses.sum().backward()
    for key, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), f"{key} must get a finite gradient"
    absent = ~inputs["mask"]
    assert not leaves["policy_logps"].grad[absent].any(), "an absent completion must get no gradient"
    for key in ("reference_logps", "reference_kl_logps"):  # the reference is frozen
        assert key not in inputs or inputs[key].grad is None


def _check_group_bf16(name: str, needs_reference: bool) -> None:
    out = preference_loss(name, **group_inputs(name, 1, reference=needs_reference, dtype=torch.bfloat16))
    for tensor in (out.losses, out.chosen_rewards, out.rejected_rewards):
        assert tensor.dtype in (torch.float32, torch.float64), f"{name} computed in {tensor.dtype}"
    assert torch.isfinite(out.losses).all()


def _check_group_boundary_errors(name: str, inputs: dict, needs_reference: bool) -> None:
    for key, value in inputs.items():
        for bad in (value[:-1], value.unsqueeze(1)):
            with pytest.raises(ValueError, match=key):
                preference_loss(name, **{**inputs, key: bad})
    required = list(get_objective(name).requires) + (["reference_logps"] if needs_reference else [])
    for key in required:
        with pytest.raises(ValueError, match=key):
            preference_loss(name, **{k: v for k, v in inputs.items() if k != key})
    with pytest.raises(ValueError, match="not_a_parameter") as info:
        preference_loss(name, **inputs, not_a_parameter=1.0)
    for valid in param_names(get_objective(name)):
        assert valid in str(info.value), f"the error should list {valid}: {info.value}"
    with pytest.raises(ValueError, match="rpo_alpha"):
        preference_loss(name, **inputs, rpo_alpha=0.1)


def _check_state(name: str, first: dict, second: dict) -> None:
    """Running statistics come back detached and finite; fed into the next call they give the same keys."""
    out = preference_loss(name, **first)
    if not out.state:
        return
    for key, value in out.state.items():
        assert isinstance(value, torch.Tensor) and not value.requires_grad, f"state {key} must be a detached tensor"
        assert torch.isfinite(value.double()).all(), f"state {key} must be finite"
    again = preference_loss(name, **second, state=out.state)
    assert torch.isfinite(again.losses).all()
    assert set(again.state) == set(out.state)


@pytest.mark.parametrize("name", sorted(n for n, o in OBJECTIVES.items() if takes_groups(o)))
def test_group_objective_contract(name):
    objective = get_objective(name)
    inputs = group_inputs(name, 0, reference=objective.needs_reference)
    _check_declaration(name)
    _check_group_outputs(name, inputs)
    _check_group_bf16(name, objective.needs_reference)
    _check_group_boundary_errors(name, inputs, objective.needs_reference)
    _check_state(name, inputs, group_inputs(name, 5, reference=objective.needs_reference))
    if not objective.needs_reference:
        with_ref = preference_loss(name, **group_inputs(name, 2, reference=True))
        without_ref = preference_loss(name, **group_inputs(name, 2, reference=False))
        torch.testing.assert_close(with_ref.losses, without_ref.losses, rtol=0, atol=0)


def test_unknown_objective_lists_valid_names():
    with pytest.raises(ValueError, match="unknown objective 'nope'") as info:
        preference_loss("nope", **random_inputs())
    for name in OBJECTIVES:
        assert name in str(info.value)


def test_close_name_gets_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'simpo'"):
        get_objective("simpoo")


def test_negative_rpo_alpha_is_rejected():
    with pytest.raises(ValueError, match="rpo_alpha must be >= 0"):
        preference_loss("dpo", **random_inputs(), rpo_alpha=-0.1)
