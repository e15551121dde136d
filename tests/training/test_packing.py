"""Packed (padding-free, prefix-shared) forwards against the plain padded forward, a second implementation:
log-probs, per-token values, gradients and the hidden states a value head reads must agree to 1e-5 (fp32)."""

from __future__ import annotations

import pytest
import torch

from preftune.testing import tiny_llama
from preftune.training.logps import TokenReference, completion_logps
from preftune.training.packing import Block, backbone_hidden, pack_rows, supports_packing

MODES = ("padding_free", "prefix_shared")


def _batch(prompts: list[list[int]], rows: list[tuple[int, list[int]]], pad: int = 2):
    """Right-padded (ids, attention, completion) of rows (prompt index, completion ids)."""
    width = max(len(prompts[p]) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    completion = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (p, c) in enumerate(rows):
        n = len(prompts[p]) + len(c)
        ids[r, :n] = torch.tensor(prompts[p] + c)
        attention[r, :n] = 1
        completion[r, len(prompts[p]) : n] = True
    return ids, attention, completion


def _random_rows(layout: list[tuple[int, int]], prompt_lengths: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in prompt_lengths]
    rows = [(p, torch.randint(3, 500, (n,), generator=gen).tolist()) for p, n in layout]
    return _batch(prompts, rows)


# pairs of 3 examples, slot-major (chosen rows then rejected rows), prompts of 4, 6 and 5 tokens
PAIRS = ([(0, 3), (1, 2), (2, 6), (0, 5), (1, 4), (2, 1)], [4, 6, 5])
# a ranked list of 3 completions, a single completion, and a row whose completion is empty
MIXED = ([(0, 2), (0, 7), (1, 3), (0, 4), (2, 0)], [5, 3, 6])


def test_pack_rows_layout_by_hand():
    """Rows: A = [5 6 | 7 8], B = [5 6 | 9], C = [4 | 3 3] (| = end of the shareable prompt).
    A and B share [5 6]: packed [5 6 7 8 9] with positions [0 1 2 3 2]; C alone: [4 3 3], positions [0 1 2].
    Attention blocks: [5 6 7 8] causal; 9 (position 2) against keys [5 6 | 9] (positions 0 1 2), all visible;
    [4 3 3] causal. With a sliding window of 2, 9 sees only 6 and itself."""
    ids, attention, completion = _batch([[5, 6], [4]], [(0, [7, 8]), (0, [9]), (1, [3, 3])])
    packed = pack_rows(ids, attention, torch.tensor([2, 2, 1]))
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3, 3]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 2]]
    assert packed.where.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1], [5, 6, 7, -1]]
    assert packed.shared_rows == 1
    first, second, third = packed.blocks
    assert (first.query, first.keys, first.causal, first.mask(None)) == ((0, 4), [(0, 4)], True, None)
    assert (second.query, second.keys, second.causal) == ((4, 5), [(0, 2), (4, 5)], False)
    assert second.mask(None)[0, 0].tolist() == [[True, True, True]]
    assert second.mask(2)[0, 0].tolist() == [[False, True, True]]
    assert (third.query, third.causal) == ((5, 8), True)
    window = first.mask(2)[0, 0]  # position p sees p-1 and p
    assert window.long().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    # the last layer's read queries only (A's positions 1 and 2, which predict its completion 7 8): causal rows
    assert first.mask(None, torch.tensor([1, 2]))[0, 0].long().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    # the additive form the attention calls get, made once per batch: 0 where allowed, -inf elsewhere
    inf = float("-inf")
    assert second.bias(2, False, torch.float32)[0, 0].tolist() == [[inf, 0.0, 0.0]]
    assert second.bias(2, False, torch.float32) is second.bias(2, False, torch.float32)
    assert first.bias(None, False, torch.float32) is None  # plain causal: sdpa's causal kernel, no mask
    first.read = torch.tensor([1, 2])
    assert first.bias(None, True, torch.float32)[0, 0].tolist() == [[0.0, 0.0, inf, inf], [0.0, 0.0, 0.0, inf]]
    assert first.bias(None, True, torch.bfloat16).dtype == torch.bfloat16


def test_an_additive_mask_gives_the_boolean_masks_attention_bitwise():
    """sdpa with ``Block.bias`` against the same block's boolean ``mask`` (sdpa converts that to 0 / -inf
    at every call): same output and gradients, bit for bit, for a 61-query block against 562 keys."""
    block = Block((501, 562), [(0, 501), (501, 562)], torch.arange(501, 562), torch.arange(562))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, generator=gen) for n in (61, 562, 562))
    grad = torch.randn(1, 4, 61, 64, generator=gen)
    results = []
    for mask in (block.mask(None), block.bias(None, False, torch.float32)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*inputs, attn_mask=mask)
        out.backward(grad)
        results.append([out, *(t.grad for t in inputs)])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_left_padding_is_not_packed():
    ids = torch.tensor([[2, 5, 6], [4, 5, 6]])
    attention = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pack_rows(ids, attention) is None


@pytest.mark.parametrize("shape", [PAIRS, MIXED], ids=["pairs", "lists-and-empty"])
@pytest.mark.parametrize("mode", MODES)
def test_logps_token_values_and_gradients_match_the_padded_forward(shape, mode):
    ids, attention, completion = _random_rows(*shape)
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    results = {}
    for run in ("padded", mode):
        policy.zero_grad()
        out = completion_logps(policy, ids, attention, completion, 7, sum_sq=True, prompt_hidden=True,
                               reference=TokenReference(reference, packing=run), packing=run)
        weights = torch.arange(1, ids.shape[0] + 1, dtype=torch.float32)  # distinct weight per row
        ((out.sums * weights).sum() + out.token_kl.sum() + out.token_log_sum_sq.sum()).backward()
        results[run] = out, {n: p.grad.clone() for n, p in policy.named_parameters()}
    (plain, plain_grads), (packed, packed_grads) = results["padded"], results[mode]
    torch.testing.assert_close(packed.counts, plain.counts)
    assert torch.equal(packed.rows, plain.rows) and torch.equal(packed.cols, plain.cols)
    for field in ("sums", "token_logps", "token_kl", "token_log_sum_sq", "reference_token_logps",
                  "reference_sums", "prompt_hidden"):
        torch.testing.assert_close(getattr(packed, field), getattr(plain, field), atol=1e-5, rtol=0, msg=field)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_prefix_sharing_computes_each_prompt_once():
    """PAIRS hold 6 rows of 4+3, 6+2, 5+6, 4+5, 6+4, 5+1 = 51 tokens; shared, the three prompts (15 tokens)
    count once: 36 tokens go through the model. Padding-free: 51. Padded: 6 rows x 11 = 66."""
    ids, attention, completion = _random_rows(*PAIRS)
    model = tiny_llama()
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    for mode in ("prefix_shared", "padding_free", "padded"):
        completion_logps(model, ids, attention, completion, packing=mode)
    assert seen == [36, 51, 66]


def test_models_without_sdpa_run_padded():
    """Eager attention may carry what sdpa cannot (soft-capping): such a model keeps the padded forward."""
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    assert not supports_packing(model.model)
    ids, attention, completion = _random_rows(*PAIRS)
    hidden, where = backbone_hidden(model.model, ids, attention, "prefix_shared", torch.tensor([4, 6, 5] * 2))
    assert hidden.shape[0] == ids.numel() and where[0, 0] == 0 and where[1, 0] == ids.shape[1]


def test_sliding_window_models_pack_exactly():
    """A Mistral with a 3-token sliding window: the packed mask must apply the window as the padded one does."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=3, pad_token_id=2)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    assert supports_packing(model.model)
    ids, attention, completion = _random_rows(*PAIRS)
    plain = completion_logps(model, ids, attention, completion, packing="padded")
    shared = completion_logps(model, ids, attention, completion, packing="prefix_shared")
    torch.testing.assert_close(shared.token_logps, plain.token_logps, atol=1e-5, rtol=0)


def _train_rows(raw: dict, output_dir, packing: str) -> list[dict]:
    import copy

    from preftune.config import config_from_dict
    from preftune.training import train

    raw = copy.deepcopy(raw)
    raw["training"].update(output_dir=str(output_dir), packing=packing)
    return [row for row in train(config_from_dict(raw)).history if "loss" in row or "eval/loss" in row]


@pytest.mark.parametrize("objective,lora", [({"name": "tdpo", "beta": 0.1}, False), ({"name": "dpo", "beta": 0.1}, True)],
                         ids=["tdpo-live-reference", "dpo-lora"])
def test_training_is_the_same_run_packed_or_padded(base_config, other_model_dir, tmp_path, objective, lora):
    """Whole runs (train steps + held-out evaluation) in each mode: losses and metrics equal to 1e-5 (summed
    log-probs near -230 to 1e-6 relative, fp32 rounding of sums in another order). TDPO
    reads the reference token by token (another model here, so the KL terms are not zero); DPO with LoRA uses
    the policy with adapters off as its reference."""
    raw = {**base_config, "objective": objective}
    if lora:
        raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
        raw["training"] = {**raw["training"], "learning_rate": 1e-2}
    else:
        raw["reference"] = {**raw["reference"], "name_or_path": str(other_model_dir)}
    padded = _train_rows(raw, tmp_path / "padded", "padded")
    shared = _train_rows(raw, tmp_path / "shared", "prefix_shared")
    assert abs(padded[-1]["eval/rewards/margins"]) > 1e-3  # the runs moved the policy away from the reference
    for plain, packed in zip(padded, shared, strict=True):
        assert packed.keys() == plain.keys()
        for key, value in plain.items():
            if "tokens_per_second" not in key and key != "grad_norm":
                assert packed[key] == pytest.approx(value, rel=1e-6, abs=1e-5), key
            elif key == "grad_norm":
                assert packed[key] == pytest.approx(value, rel=1e-4), key


def test_a_row_that_is_all_prompt_shares_it_and_scores_nothing():
    """Rows [5 6 | 7] and [5 6 |] (an empty completion, as a cut KTO row can be): the second row is all
    prefix, so it adds no token and no attention block; its last position reads the shared prefix."""
    ids, attention, completion = _batch([[5, 6, 8]], [(0, [7]), (0, [])])
    packed = pack_rows(ids, attention, torch.tensor([3, 3]))
    assert packed.input_ids.tolist() == [[5, 6, 8, 7]] and len(packed.blocks) == 1
    assert packed.where.tolist() == [[0, 1, 2, 3], [0, 1, 2, -1]]
    model = tiny_llama()
    plain = completion_logps(model, ids, attention, completion, packing="padded", prompt_hidden=True)
    shared = completion_logps(model, ids, attention, completion, packing="prefix_shared", prompt_hidden=True)
    torch.testing.assert_close(shared.sums, plain.sums, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.prompt_hidden, plain.prompt_hidden, atol=1e-5, rtol=0)


def _rows_into(modules: dict[str, torch.nn.Module]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {name: [] for name in modules}
    for name, module in modules.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen[name].append(args[0].shape[:-1].numel()))
    return seen


def test_the_last_layer_computes_only_the_rows_read():
    """PAIRS pack into 36 tokens (above). The log-probs read the positions that predict a completion token:
    one per completion token, 3+2+6+5+4+1 = 21, of which the three prompts' last positions are read by both
    rows of their pair: 18 packed rows. The last layer's query and output projections and its MLP run on
    those 18; the first layer, whose every row feeds the last layer's keys and values, runs on all 36; a plain
    forward afterwards (generation) runs on all its rows again."""
    ids, attention, completion = _random_rows(*PAIRS)
    model = tiny_llama()
    first, last = model.model.layers
    seen = _rows_into({"first mlp": first.mlp, "q_proj": last.self_attn.q_proj, "o_proj": last.self_attn.o_proj,
                       "mlp": last.mlp, "k_proj": last.self_attn.k_proj})
    completion_logps(model, ids, attention, completion)
    assert seen == {"first mlp": [36], "q_proj": [18], "o_proj": [18], "mlp": [18], "k_proj": [36]}
    model(input_ids=ids[:1, :5])
    assert seen["mlp"] == [18, 5] and seen["q_proj"] == [18, 5]


def test_reading_fewer_rows_is_exact_under_gradient_checkpointing():
    """Gradient checkpointing reruns the last layer's ``forward`` (not its hooks) in backward: the same 18 rows
    (above) must be read there. The log-probs and every parameter's gradient equal the padded forward's (6 rows
    x 11 = 66 rows, all computed)."""
    ids, attention, completion = _random_rows(*PAIRS)
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seen = _rows_into({"mlp": model.model.layers[-1].mlp})
    results = {}
    for run in ("padded", "prefix_shared"):
        model.zero_grad()
        out = completion_logps(model, ids, attention, completion, packing=run)
        (out.sums * torch.arange(1.0, 7.0)).sum().backward()
        results[run] = out.token_logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert seen["mlp"][0] == 66 and seen["mlp"][-2:] == [18, 18]  # packed: forward, then recomputed in backward
    torch.testing.assert_close(results["prefix_shared"][0], results["padded"][0], atol=1e-5, rtol=0)
    for name, grad in results["padded"][1].items():
        torch.testing.assert_close(results["prefix_shared"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_reward_model_reads_each_texts_last_token():
    """A reward model reads one state per text, its last token: the last layer of a grouped-query, sliding-window
    Mistral runs on one query per attention block (sdpa's single-query path) and gives the padded states."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=3, pad_token_id=2)
    torch.manual_seed(0)
    backbone = MistralForCausalLM(config).eval().model
    ids, attention, _ = _random_rows(*PAIRS)
    last = attention.sum(dim=1) - 1
    rows = torch.arange(ids.shape[0])
    seen = _rows_into({"mlp": backbone.layers[-1].mlp})
    plain, where = backbone_hidden(backbone, ids, attention, "padded")
    packed, packed_where = backbone_hidden(backbone, ids, attention, "prefix_shared", torch.tensor([4, 6, 5] * 2),
                                           (rows, last))
    torch.testing.assert_close(packed[packed_where[rows, last]], plain[where[rows, last]], atol=1e-5, rtol=0)
    assert seen["mlp"] == [ids.numel(), 6]


def test_a_mixture_of_experts_last_layer_computes_every_row():
    """A Mixtral layer routes tokens among experts (and records router logits over all rows): its rows are
    not cut, and the packed log-probs still equal the padded ones."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from preftune.training.packing import _row_wise_modules

    config = MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, pad_token_id=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    assert _row_wise_modules(model.model.layers[-1]) == []
    ids, attention, completion = _random_rows(*PAIRS)
    seen = _rows_into({"mlp": model.model.layers[-1].mlp})
    plain = completion_logps(model, ids, attention, completion, packing="padded")
    shared = completion_logps(model, ids, attention, completion, packing="prefix_shared")
    torch.testing.assert_close(shared.token_logps, plain.token_logps, atol=1e-5, rtol=0)
    assert seen["mlp"] == [ids.numel(), 36]
