"""preftune's decode loop against ``model.generate`` (greedy, token for token, rows finishing early included),
its logit filters against transformers' warpers, and seeded sampling."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from preftune.feedback import decode as decode_module
from preftune.feedback.decode import (
    DecodeSettings,
    decode,
    decode_supported,
    draw,
    filter_logits,
)
from preftune.feedback.sampling import HFSampler, SamplingConfig
from preftune.testing import tiny_llama

PAD = 2


def _prompts(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 9, 3, 7)]


def _generate(model, prompts, max_new_tokens, stop_ids) -> list[list[int]]:
    """Plain ``generate``, greedy, each row cut after its first stop token (generate pads after it)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (ids != PAD).long()
    for row, p in enumerate(prompts):  # a prompt token equal to PAD must stay attended
        mask[row, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=PAD, eos_token_id=stop_ids, temperature=None, top_p=None, top_k=None)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:cut])
    return rows


def _stop_mid_sequence(model, prompts) -> int:
    """A token that greedy decoding emits in the middle of some row: as a stop token, that row (and maybe
    others) finishes early and leaves the batch while the rest go on."""
    free = _generate(model, prompts, 12, [1])
    return free[1][4]


@pytest.mark.parametrize("architecture", ["llama", "mistral-sliding-window"])
def test_greedy_tokens_equal_generate_with_rows_finishing_early(architecture):
    model = _model(architecture)
    assert decode_supported(model)
    prompts = _prompts()
    stop = [1, _stop_mid_sequence(model, prompts)]
    expected = _generate(model, prompts, 12, stop)
    assert min(len(r) for r in expected) < 12 and max(len(r) for r in expected) == 12  # some rows end early
    got = decode(model, prompts, DecodeSettings(12, stop, PAD))
    assert got == expected


def test_packed_linears_compute_what_the_plain_linear_computes():
    """Inside ``packed_linears``, each of a tiny Llama's 15 linears (2 layers x 7 and the head) multiplies
    through oneDNN's prepacked weight and gives ``F.linear``'s output to 1e-5 (the same dot products summed in
    another order) for 1, 5, 16, 17 and 40 rows, 2-D and 3-D, with a bias; with gradients on, the plain
    product runs (the packed one has no backward); afterwards every layer has its own forward back and the
    model's outputs are bitwise what they were."""
    model = tiny_llama(seed=3)
    layer = model.model.layers[0].mlp.up_proj
    layer.bias = torch.nn.Parameter(torch.randn(layer.out_features))
    inputs = [torch.randn(n, layer.in_features) for n in (1, 5, 16, 17, 40)] + [torch.randn(4, 8, layer.in_features)]
    ids = torch.tensor([_prompts()[1]])
    before = model(ids).logits
    with torch.no_grad():
        expected = [torch.nn.functional.linear(x, layer.weight, layer.bias) for x in inputs]
        with decode_module.packed_linears(model, rows=8) as count:
            got = [layer(x) for x in inputs]
            assert "forward" in vars(layer)
            with torch.enable_grad():
                graded = layer(inputs[0].requires_grad_())
            assert graded.grad_fn is not None
            packed_logits = model(ids).logits
    assert count == 15 and not any("forward" in vars(m) for m in model.modules())
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_logits, before, atol=1e-5, rtol=1e-5)
    assert torch.equal(model(ids).logits, before)


def test_packed_linears_leave_alone_what_they_cannot_pack(monkeypatch):
    """A layer whose forward something else set on the instance keeps it; with gradients on, or when the
    packed copies would not leave as much memory free again, nothing is packed."""
    model = tiny_llama(seed=3)
    head = model.get_output_embeddings()
    hooked = head.forward
    head.forward = hooked
    with torch.no_grad(), decode_module.packed_linears(model, rows=4) as count:
        assert count == 14 and head.forward is hooked
    with decode_module.packed_linears(model, rows=4) as count:  # gradients on
        assert count == 0
    monkeypatch.setattr(decode_module, "_available_memory", lambda: 1000)
    with torch.no_grad(), decode_module.packed_linears(model, rows=4) as count:
        assert count == 0


def test_filter_logits_equals_transformers_warpers():
    """Temperature 0.7, then top-k 20, then top-p 0.8, on random logits: the same tokens survive and the
    surviving logits are equal."""
    torch.manual_seed(0)
    logits = torch.randn(6, 100) * 3
    settings = DecodeSettings(1, [1], PAD, temperature=0.7, top_p=0.8, top_k=20)
    ids = torch.zeros(6, 1, dtype=torch.long)
    expected = logits
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        expected = warper(ids, expected)
    got = filter_logits(logits, settings)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
    assert int((~torch.isinf(got)).sum(1).min()) >= 1 and int((~torch.isinf(got)).sum(1).max()) <= 20


def test_draw_follows_the_probabilities_and_never_draws_a_filtered_token():
    """Inverting each row's cumulative distribution at a uniform number: over 40,000 draws of the rows
    [0.5, 0, 0.3, 0.2] and [0, 0, 0, 1] (unnormalised: ×2), each frequency is within 4 standard errors of its
    probability (binomial: sqrt(p(1-p)/n) <= 0.0025); the zero entries are never drawn; the same points give
    the same draws."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 2.0]]).repeat(20_000, 1)
    points = torch.rand(40_000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    first = draw(probs, points)
    assert torch.equal(first, draw(probs, points.clone()))
    counts = torch.bincount(first[0::2], minlength=4).double() / 20_000
    assert counts[1] == 0 and torch.equal(first[1::2], torch.full((20_000,), 3))
    for got, p in zip(counts.tolist(), [0.5, 0.0, 0.3, 0.2], strict=True):
        assert abs(got - p) <= 4 * (p * (1 - p) / 20_000) ** 0.5 + 1e-12


def test_draw_picks_the_entry_one_cumulative_sum_over_the_row_picks():
    """The two-level search against the plain inverse CDF (one float64 cumulative sum over the whole row):
    the same index for 64 rows x 50 points over 1,000 entries (not a multiple of the block), with a
    third of the entries filtered to 0 and one row whose only mass sits in the last, partial block."""
    gen = torch.Generator().manual_seed(3)
    probs = torch.randn(64, 1000, generator=gen).mul(4).softmax(-1)
    probs[torch.rand(64, 1000, generator=gen) < 0.33] = 0.0
    probs[0] = 0.0
    probs[0, 990] = 0.25
    for _ in range(50):
        points = torch.rand(64, generator=gen, dtype=torch.float64)
        cdf = probs.double().cumsum(-1)
        expected = torch.searchsorted(cdf, points[:, None] * cdf[:, -1:], right=True).squeeze(1)
        got = draw(probs, points)
        assert torch.equal(got, expected) and bool((probs.gather(1, got[:, None]) > 0).all())
    assert torch.equal(draw(probs[:1], torch.tensor([1 - 2**-53], dtype=torch.float64)), torch.tensor([990]))


def test_sampling_is_a_function_of_the_seed():
    model, prompts = tiny_llama(seed=3), _prompts()
    settings = DecodeSettings(8, [1], PAD, temperature=1.0)
    first = decode(model, prompts, settings, samples=3, seeds=[5, 6, 7, 8])
    again = decode(model, prompts, settings, samples=3, seeds=[5, 6, 7, 8])
    other = decode(model, prompts, settings, samples=3, seeds=[5, 6, 7, 9])
    assert first == again and first[:9] == other[:9] and first[9:] != other[9:]  # only prompt 3's seed changed
    assert len(first) == 12 and all(1 <= len(row) <= 8 for row in first)
    assert len({tuple(row) for row in first[:3]}) > 1  # the K samples of a prompt differ


def _model(architecture: str):
    if architecture == "mistral-sliding-window":
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=4, pad_token_id=PAD,
                               bos_token_id=0, eos_token_id=1)
        torch.manual_seed(3)
        return MistralForCausalLM(config).eval()
    model = tiny_llama(seed=3)
    if architecture == "llama-eager":  # additive float masks instead of SDPA's boolean ones
        model.config._attn_implementation = "eager"
    return model


def test_the_attention_decides_the_mask_or_leaves_the_model_to_generate():
    """Flash or flex attention take no 4-D mask, so the slot cache cannot hand them one row per slot: such a
    model is left to ``generate``. A model trained with preftune's packed-sequence attention (which registers
    SDPA's masks) keeps the fast loop after training, with ``generate``'s greedy tokens (an online run samples
    from the policy it trains)."""
    from preftune.training.packing import _use_packed_attention

    model = tiny_llama(seed=3)
    prompts = _prompts()
    expected = _generate(model, prompts, 8, [1])
    assert decode_supported(model)
    model.config._attn_implementation = "flex_attention"
    assert not decode_supported(model)
    _use_packed_attention(model.config)
    assert decode_supported(model)
    assert decode(model, prompts, DecodeSettings(8, [1], PAD), slots=2) == expected


@pytest.mark.parametrize("architecture", ["llama", "llama-eager", "mistral-sliding-window"])
def test_continuous_batching_gives_generates_greedy_tokens(architecture):
    """Eight prompts of 3-9 tokens through 1, 3 and 5 slots: rows ending early (a stop token met mid-row) are
    refilled by the next prompt, whose cache starts at position 0 of a slot another row used; every row's
    tokens are still ``generate``'s for that prompt (the sliding window of 4 included)."""
    model = _model(architecture)
    prompts = _prompts() + _prompts(1)
    stop = [1, _stop_mid_sequence(model, prompts)]
    expected = _generate(model, prompts, 12, stop)
    assert min(len(r) for r in expected) < 12 and max(len(r) for r in expected) == 12
    for slots in (1, 3, 5):
        assert decode(model, prompts, DecodeSettings(12, stop, PAD), slots=slots) == expected


def test_the_slot_cache_grows_under_live_rows_when_a_longer_prompt_comes(monkeypatch):
    """Two slots sized for the first prompts (4 tokens + 12 new); a 20-token prompt enters while the other
    slot is mid-row: the cache grows to 32 positions, keeping what the live row holds, and every row's
    greedy tokens are still ``generate``'s."""
    model = tiny_llama(seed=3)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (3, 4, 20, 6)]
    stop = [1, _stop_mid_sequence(model, prompts)]
    expected = _generate(model, prompts, 12, stop)
    sizes = []
    original = decode_module.SlotCache.reserve

    def recorded(cache, positions, like):
        original(cache, positions, like)
        sizes.append((cache.capacity, cache.lengths.tolist()))  # a live slot holds positions, a free one none

    monkeypatch.setattr(decode_module.SlotCache, "reserve", recorded)
    assert decode(model, prompts, DecodeSettings(12, stop, PAD), slots=2) == expected
    assert sizes[0][0] == 16 and any(size == 32 and max(lengths) > 0 for size, lengths in sizes)


def test_a_prompts_samples_depend_on_its_seed_not_on_its_neighbours():
    """Sampled (T = 1, top-k 50): prompt i's samples are the same decoded with all prompts at once, through 4
    slots (rows refilled as others end), or alone; ``decode_stream`` hands each prompt over once, when its last
    sample ends. The stop tokens are tokens two rows drew mid-row (the draws before a stop do not depend on
    the stop tokens), so rows end at different steps."""
    model, prompts = tiny_llama(seed=3), _prompts() + _prompts(1)
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    free = decode(model, prompts, DecodeSettings(10, [1], PAD, temperature=1.0, top_k=50), samples=2, seeds=seeds)
    settings = DecodeSettings(10, [1, free[0][2], free[9][5]], PAD, temperature=1.0, top_k=50)
    together = decode(model, prompts, settings, samples=2, seeds=seeds)
    assert decode(model, prompts, settings, samples=2, seeds=seeds, slots=4) == together
    for i in (1, 6):
        assert decode(model, prompts[i : i + 1], settings, samples=2, seeds=seeds[i : i + 1]) == together[2 * i : 2 * i + 2]
    streamed = list(decode_module.decode_stream(model, prompts, settings, 2, seeds, slots=4))
    assert sorted(i for i, _ in streamed) == list(range(8))
    assert all(rows == together[2 * i : 2 * i + 2] for i, rows in streamed)
    assert len({len(row) for row in together}) > 1  # rows end at different steps


def test_decode_checks_its_seeds():
    with pytest.raises(ValueError, match="3 seeds for 4 prompts"):
        decode(tiny_llama(seed=3), _prompts(), DecodeSettings(4, [1], PAD, temperature=1.0), seeds=[1, 2, 3])


def test_sampler_greedy_repeats_one_completion_per_prompt(tiny_model_dir):
    """Greedy with K = 3: transformers refuses several greedy sequences; the sampler decodes once and repeats."""
    from preftune.feedback.generate import GenerateConfig
    from preftune.feedback.sampling import load_for_sampling, load_tokenizer_for

    model = load_for_sampling(str(tiny_model_dir), GenerateConfig().model)
    tokenizer = load_tokenizer_for(str(tiny_model_dir))
    sampler = HFSampler(model, tokenizer, SamplingConfig(num_samples=3, max_new_tokens=5, temperature=0.0))
    prompts = [tokenizer("Review:")["input_ids"], tokenizer("A film")["input_ids"]]
    texts = sampler.sample(prompts, [0, 1])
    ids = _generate(model, prompts, 5, sampler.stop_ids)
    expected = tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert texts == [[expected[0]] * 3, [expected[1]] * 3]


def test_sampler_seeds_each_prompt_from_its_index(tiny_model_dir):
    """The resume contract: a prompt's samples depend on the seed and its index in the prompt file only, not on
    the batch it is sampled in."""
    from preftune.feedback.generate import GenerateConfig
    from preftune.feedback.sampling import load_for_sampling, load_tokenizer_for, prompt_seed

    model = load_for_sampling(str(tiny_model_dir), GenerateConfig().model)
    tokenizer = load_tokenizer_for(str(tiny_model_dir))
    sampling = SamplingConfig(num_samples=2, max_new_tokens=6, temperature=0.9, top_k=40, seed=7)
    sampler = HFSampler(model, tokenizer, sampling)
    prompts = [tokenizer("Review:")["input_ids"], tokenizer("A film that")["input_ids"]]
    texts = sampler.sample(prompts, [4, 5])
    settings = DecodeSettings(6, sampler.stop_ids, tokenizer.pad_token_id, 0.9, 1.0, 40)
    ids = decode(model, prompts, settings, 2, [prompt_seed(7, 4), prompt_seed(7, 5)])
    expected = tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert texts == [expected[:2], expected[2:]]
    assert sampler.sample(prompts[1:], [5]) == texts[1:]  # alone, in a batch of its own
    assert sampler.sample(prompts, [6, 7]) != texts  # other indices, other seeds
