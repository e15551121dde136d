"""Chunked completion log-probs against a second implementation: full [N, T, V] logits on the same model."""

from __future__ import annotations

import pytest
import torch

from preftune.testing import tiny_llama
from preftune.training.logps import TokenReference, completion_logps


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (4, 12))
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 5:] = True
    completion[2, 9:] = False
    completion[3, 5:7] = False  # a completion that starts later
    return ids, attention, completion


def full_logprobs(model, ids, attention):
    return model(input_ids=ids, attention_mask=attention).logits.float().log_softmax(-1)[:, :-1]


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_sums_per_token_values_kl_and_sum_sq_match_full_logits(batch, chunk):
    ids, attention, completion = batch
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    out = completion_logps(policy, ids, attention, completion, chunk, sum_sq=True, reference=TokenReference(reference))
    lp, rp = full_logprobs(policy, ids, attention), full_logprobs(reference, ids, attention)
    mask = completion[:, 1:]
    target = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.sums, (target * mask).sum(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.counts, mask.sum(1))
    torch.testing.assert_close(out.token_logps, target[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.token_kl, (rp.exp() * (rp - lp)).sum(-1)[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.token_log_sum_sq, torch.logsumexp(2 * lp, -1)[mask], atol=1e-5, rtol=0)
    ref_target = rp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.reference_sums, (ref_target * mask).sum(1), atol=1e-5, rtol=0)
    padded, padded_mask = out.padded(out.token_logps)
    assert padded.shape == (4, 7) and padded_mask.sum(1).tolist() == [7, 7, 4, 5]
    torch.testing.assert_close(padded[3, :5], target[3][mask[3]], atol=1e-5, rtol=0)


def test_gradients_equal_the_full_logits_gradients(batch):
    """Checkpointed chunks recompute the logits in backward: the gradient must equal the plain one."""
    ids, attention, completion = batch
    model = tiny_llama(seed=0)
    completion_logps(model, ids, attention, completion, chunk_size=5).sums.sum().backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    target = full_logprobs(model, ids, attention).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (target * completion[:, 1:]).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_large_vocabularies_get_shorter_chunks(batch, monkeypatch):
    """CHUNK_LOGITS caps a chunk's logits: with room for 3 rows of the 512-token vocabulary, chunks of 4096
    positions become chunks of 3, and the sums still equal the full-logits ones (the general path, asked
    for log Σ p² too, and the plain head's path)."""
    from preftune.training import head_logprobs, logps

    ids, attention, completion = batch
    model = tiny_llama(seed=0)
    sizes = {"general": [], "plain head": []}
    chunk_stats, head_chunks = logps._chunk_stats, head_logprobs._head_chunks

    def recorded_chunks(inputs, *args):
        for part, logits, logprobs in head_chunks(inputs, *args):
            sizes["plain head"].append(part.stop - part.start)
            yield part, logits, logprobs

    monkeypatch.setattr(logps, "CHUNK_LOGITS", 3 * 512)
    monkeypatch.setattr(logps, "_chunk_stats",
                        lambda head, hidden, *a: sizes["general"].append(len(hidden)) or chunk_stats(head, hidden, *a))
    monkeypatch.setattr(head_logprobs, "_head_chunks", recorded_chunks)
    target = full_logprobs(model, ids, attention).gather(-1, ids[:, 1:, None]).squeeze(-1)
    for sum_sq in (True, False):
        out = completion_logps(model, ids, attention, completion, chunk_size=4096, sum_sq=sum_sq)
        torch.testing.assert_close(out.sums, (target * completion[:, 1:]).sum(1), atol=1e-5, rtol=0)
    for name in sizes:
        assert max(sizes[name]) == 3 and sum(sizes[name]) == int(completion[:, 1:].sum()), name


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("head", ["frozen", "frozen with bias", "trainable with bias"])
def test_a_plain_head_gives_the_full_logits_values_and_gradients(batch, chunk, head, monkeypatch):
    """A plain linear LM head asked for log-probs only goes through ``HeadLogprobs``: its two reused buffers
    and hand-written backward give the full-logits log-probs and every gradient (the head's own, bias
    included, when it trains), for chunks of one row, a last chunk that is partial (7) and one chunk. The
    general chunk path is never entered."""
    from preftune.training import logps

    ids, attention, completion = batch
    model = tiny_llama(seed=0)
    if "bias" in head:
        model.lm_head.bias = torch.nn.Parameter(torch.randn(512, generator=torch.Generator().manual_seed(3)))
    if head.startswith("frozen"):
        model.lm_head.requires_grad_(False)
    monkeypatch.setattr(logps, "_chunk_stats", lambda *a: pytest.fail("the general path ran"))
    out = completion_logps(model, ids, attention, completion, chunk_size=chunk)
    out.sums.sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    mask = completion[:, 1:]
    target = full_logprobs(model, ids, attention).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (target * mask).sum().backward()
    torch.testing.assert_close(out.token_logps, target[mask].detach(), atol=1e-5, rtol=0)
    trains_head = not head.startswith("frozen")
    assert {"lm_head.weight", "lm_head.bias"} & fused.keys() == ({"lm_head.weight", "lm_head.bias"} if trains_head else set())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(fused[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("positions", "most", "expected"), [(351, 170, 117), (340, 170, 170), (5, 170, 5),
                                                             (0, 170, 1), (23, 7, 6), (171, 170, 86)])
def test_positions_split_into_chunks_of_about_equal_length(positions, most, expected):
    """ceil(n / ceil(n / most)): 351 positions with at most 170 a chunk need 3 chunks, 117 each (not 170, 170,
    11); 171 need 2, 86 + 85; 23 with at most 7 need 4, 6 + 6 + 6 + 5."""
    from preftune.training.logps import _even_chunks

    assert _even_chunks(positions, most) == expected


def test_a_frozen_weight_is_cast_once_until_it_changes():
    """The bf16 copy of a frozen weight is the same tensor call after call, and a new one (with the new
    values) after an in-place update of the parameter or a swapped ``.data``; under inference mode a copy is
    made but not kept (it could not be saved for backward outside it)."""
    from preftune.training.precision import kept_cast

    weight = torch.nn.Parameter(torch.randn(6, 4), requires_grad=False)
    first = kept_cast(weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, weight.to(torch.bfloat16))
    assert kept_cast(weight, torch.bfloat16) is first
    assert kept_cast(weight, torch.float32) is weight
    with torch.no_grad():
        weight.mul_(2)
    second = kept_cast(weight, torch.bfloat16)
    assert second is not first and torch.equal(second, weight.to(torch.bfloat16))
    weight.data = torch.full((6, 4), 3.0)
    assert torch.equal(kept_cast(weight, torch.bfloat16), torch.full((6, 4), 3.0, dtype=torch.bfloat16))
    with torch.inference_mode():
        inside = kept_cast(torch.nn.Parameter(torch.ones(2, 2), requires_grad=False), torch.bfloat16)
    assert inside.is_inference() and not kept_cast(weight, torch.bfloat16).is_inference()


def test_the_head_scratch_memory_is_reused_and_grows(batch):
    """``HeadLogprobs`` works in scratch kept from call to call: a smaller request reuses the memory, a larger
    one replaces it, a request under inference mode gets fresh memory; the log-probs stay the full-logits ones
    through all three (inference mode first, then chunks of 1, then one chunk of every position)."""
    from preftune.training import head_logprobs

    small = head_logprobs._workspace(2, 3, torch.float32, torch.device("cpu"))
    assert head_logprobs._workspace(1, 5, torch.float32, torch.device("cpu")).data_ptr() == small.data_ptr()
    with torch.inference_mode():
        assert head_logprobs._workspace(2, 3, torch.float32, torch.device("cpu")).data_ptr() != small.data_ptr()
    head_logprobs._WORKSPACES.clear()
    ids, attention, completion = batch
    model = tiny_llama(seed=0).requires_grad_(False)
    mask = completion[:, 1:]
    target = full_logprobs(model, ids, attention).gather(-1, ids[:, 1:, None]).squeeze(-1)[mask]
    with torch.inference_mode():
        first = completion_logps(model, ids, attention, completion, chunk_size=4096).token_logps
    assert not head_logprobs._WORKSPACES
    for chunk, rows in ((1, 1), (4096, 23)):  # 23 completion positions, a 512-token vocabulary
        out = completion_logps(model, ids, attention, completion, chunk_size=chunk).token_logps
        torch.testing.assert_close(out, target, atol=1e-5, rtol=0)
        assert head_logprobs._WORKSPACES[torch.float32, torch.device("cpu")].numel() == rows * 512
    torch.testing.assert_close(first, target, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("head", ["frozen", "trainable with bias"])
def test_a_kept_log_softmax_gives_the_recomputed_gradients_bitwise(batch, chunk, precision, head, monkeypatch):
    """A differentiated ``HeadLogprobs`` forward keeps its log-softmax (23 positions x 512 = 11,776 entries,
    under ``KEPT_LOGITS``) and its backward reads it instead of recomputing the logits: no head product runs
    in backward, and the log-probs and every gradient are bitwise those of the recomputing backward
    (``KEPT_LOGITS = 0``), in fp32 and under bf16 autocast. A second differentiated forward before the first
    one's backward takes the kept memory: the first backward then recomputes, with the same gradients; a forward
    under ``no_grad`` (an evaluation) leaves it alone, though the head's weight requires grad."""
    from preftune.training import head_logprobs

    ids, attention, completion = batch
    model = tiny_llama(seed=0)
    if "bias" in head:
        model.lm_head.bias = torch.nn.Parameter(torch.randn(512, generator=torch.Generator().manual_seed(3)))
    else:
        model.lm_head.requires_grad_(False)
    calls, head_chunks = [], head_logprobs._head_chunks
    monkeypatch.setattr(head_logprobs, "_head_chunks", lambda *a: calls.append(len(a[0])) or head_chunks(*a))

    def run(between=None):
        model.zero_grad()
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = completion_logps(model, ids, attention, completion, chunk_size=chunk)
            if between is not None:  # another forward (another batch's) before this one's backward
                between(lambda: completion_logps(model, ids.flip(0), attention.flip(0), completion.flip(0), chunk))
        forward_calls = len(calls)
        out.sums.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.token_logps.detach(), grads, forward_calls, len(calls) - forward_calls

    def without_grad(forward):
        with torch.no_grad():
            forward()

    kept_logps, kept_grads, forward_calls, backward_calls = run()
    assert (forward_calls, backward_calls) == (1, 0)
    assert head_logprobs._kept_owner[0] is None  # the backward claimed it
    assert run(between=without_grad)[3] == 0  # an evaluation forward leaves the kept memory alone
    stale_logps, stale_grads, _, stale_backward_calls = run(between=lambda forward: forward())
    assert stale_backward_calls == 1  # a differentiated one takes it: recomputed
    monkeypatch.setattr(head_logprobs, "KEPT_LOGITS", 0)
    logps, grads, _, backward_calls = run()
    assert backward_calls == 1
    assert torch.equal(kept_logps, logps) and torch.equal(stale_logps, logps)
    assert kept_grads.keys() == grads.keys() == stale_grads.keys() and len(grads) > 4
    for name, grad in grads.items():
        assert torch.equal(kept_grads[name], grad) and torch.equal(stale_grads[name], grad), name
