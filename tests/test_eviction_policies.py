"""Eviction fast path (slot cache, torch references on CPU) == the paper-faithful reference (full cache, evicted
tokens masked to -inf): the same kept set after the prompt and after every decode step, and the same attention
output. Both compute in fp32 on CPU, so outputs agree to summation-order error (1e-5); kept sets must be equal
exactly (ties are broken the same way by rule: the older token goes first).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eviction_cases import run_side_by_side
from kvfx.eviction import make_policy
from kvfx.eviction.base import EvictionError
from kvfx.eviction.slot_cache import EvictingLayerCache
from kvfx.spec import EvictH2O, EvictKeyformer, EvictNone, EvictSnapKV, EvictWindow

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@st.composite
def policies(draw):
    method = draw(st.sampled_from(["window", "h2o", "keyformer", "snapkv"]))
    fraction = draw(st.sampled_from([0.3, 0.5, 0.8]))
    if method == "window":
        return EvictWindow(sink=draw(st.integers(0, 3)), budget=draw(st.sampled_from([fraction, 9])))
    if method == "h2o":
        return EvictH2O(budget=draw(st.sampled_from([fraction, 8])), recent=draw(st.sampled_from([0.0, 0.25, 0.5, 2])))
    if method == "keyformer":
        return EvictKeyformer(budget=draw(st.sampled_from([fraction, 8])), recent=draw(st.sampled_from([0.0, 0.3, 3])),
                              tau=draw(st.sampled_from([(1.0, 2.0), (0.5, 1.5)])), seed=draw(st.integers(0, 9)),
                              max_new_tokens=draw(st.sampled_from([4, 256])))
    return EvictSnapKV(budget=draw(st.sampled_from([0.6, 12])), window=draw(st.integers(1, 4)),
                       pool=draw(st.sampled_from([1, 3, 5])), pooling=draw(st.sampled_from(["max", "avg"])))


@SETTINGS
@given(config=policies(), batch=st.integers(1, 3), heads=st.sampled_from([(4, 2), (4, 4), (4, 1)]),
       prompt=st.integers(20, 32), steps=st.integers(1, 12), mask_kind=st.sampled_from(["bool", "float", "alibi"]),
       seed=st.integers(0, 2**16), pads=st.lists(st.integers(0, 4), min_size=3, max_size=3))
def test_fast_path_equals_paper_faithful_reference(config, batch, heads, prompt, steps, mask_kind, seed, pads):
    q_heads, kv_heads = heads
    run_side_by_side([config] * kv_heads, batch=batch, q_heads=q_heads, kv_heads=kv_heads, prompt=prompt,
                     steps=steps, pads=pads, mask_kind=mask_kind, seed=seed)


@SETTINGS
@given(first=policies(), second=policies(), seed=st.integers(0, 2**16))
def test_per_head_policies_in_one_layer(first, second, seed):
    """Each KV head follows its own policy; a head with `none` keeps everything (its layer grows in chunks)."""
    if first.method in ("h2o", "keyformer") and second.method in ("h2o", "keyformer") and first != second:
        second = EvictNone()  # two different scoring policies in one layer are refused (tested below)
    run_side_by_side([first, second, EvictNone()], q_heads=6, kv_heads=3, prompt=26, steps=10, seed=seed)


@pytest.mark.parametrize("config", [EvictWindow(sink=2, budget=8), EvictH2O(budget=0.5, recent=0.25),
                                    EvictKeyformer(budget=0.5), EvictSnapKV(budget=10, window=3)])
def test_sliding_window_layers(config):
    """A sliding-window layer (Mistral, Gemma 2): tokens that left the window are never kept nor attended."""
    run_side_by_side([config] * 2, prompt=24, steps=12, window=10, pads=(0, 2))


@pytest.mark.parametrize("heads", [(4, 2), (4, 1)])
@pytest.mark.parametrize("pads", [(0, 0), (0, 3)])
def test_window_with_compact_positions(heads, pads):
    """StreamingLLM's positions within the cache: kept keys and the query re-rotated as if the kept tokens sat at
    0, 1, ...; one KV head compact and one not when there are two, to check they do not mix."""
    q_heads, kv_heads = heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    compact = EvictWindow(sink=2, budget=8, positions="compact")
    configs = [compact, EvictWindow(sink=2, budget=8)][:kv_heads]
    run_side_by_side(configs, q_heads=q_heads, kv_heads=kv_heads, prompt=20, steps=12, pads=pads, inv_freq=inv_freq,
                     atol=2e-5, rtol=2e-5)


def test_compact_positions_change_the_output(monkeypatch):
    """Against a reference that keeps the original positions, the compact fast path must differ (else the test
    above could not fail)."""
    import eviction_cases
    from kvfx.eviction.faithful import FaithfulAttention

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    monkeypatch.setattr(eviction_cases, "FaithfulAttention", lambda layer, configs, inv_freq=None: FaithfulAttention(
        layer, [EvictWindow(sink=2, budget=8)] * len(configs)))
    with pytest.raises(AssertionError, match="decode step 0"):
        run_side_by_side([EvictWindow(sink=2, budget=8, positions="compact")] * 2, prompt=20, steps=3,
                         inv_freq=inv_freq)


@pytest.mark.parametrize("config", [EvictH2O(budget=0.5), EvictKeyformer(budget=0.5)])
def test_softcapped_logits(config):
    run_side_by_side([config] * 2, prompt=20, steps=6, softcap=5.0)


def test_memory_is_flat_after_the_prompt():
    """Generating 4x the budget in new tokens allocates nothing after the prompt (the budget + 1 spare slot)."""
    cache = run_side_by_side([EvictH2O(budget=6, recent=2)] * 2, prompt=24, steps=1)
    allocated, capacity = cache.nbytes, cache.capacity
    assert capacity == 6 + 1
    run = run_side_by_side([EvictH2O(budget=6, recent=2)] * 2, prompt=24, steps=24)
    assert (run.nbytes, run.capacity) == (allocated, capacity)
    assert int(run.live.max()) == 6


def test_window_keeps_sinks_and_the_most_recent_tokens():
    cache = run_side_by_side([EvictWindow(sink=2, budget=6)], batch=2, q_heads=2, kv_heads=1, prompt=12, steps=5,
                             pads=(0, 3))
    total = 12 + 5
    assert cache.kept_positions() == [[{0, 1, *range(total - 4, total)}], [{3, 4, *range(total - 4, total)}]]


def test_padding_is_never_kept_nor_attended():
    cache = run_side_by_side([EvictH2O(budget=1.0, recent=0.5)] * 2, batch=2, prompt=16, steps=4, pads=(0, 5))
    assert all(min(kept) >= 5 for kept in cache.kept_positions()[1])
    assert min(min(kept) for kept in cache.kept_positions()[0]) == 0


def test_budget_is_a_fraction_of_each_rows_real_prompt():
    cache = run_side_by_side([EvictH2O(budget=0.5, recent=0.5)], batch=2, q_heads=2, kv_heads=1, prompt=20, steps=3,
                             pads=(0, 6))
    assert cache.budget[:, 0].tolist() == [10, 7]
    assert cache.live[:, 0].tolist() == [10, 7]


# ---- bad input: clear errors ---------------------------------------------------------------------------------


def _prefill(configs, prompt=10, heads=2):
    cache = EvictingLayerCache(0, [make_policy(c) for c in configs])
    q = torch.randn(1, heads, prompt, 16)
    k = torch.randn(1, heads, prompt, 16)
    cache.compress_prompt(q, k, k, None, scale=0.25, softcap=0.0, is_causal=True)
    return cache


def test_a_token_budget_larger_than_the_prompt_is_an_error():
    with pytest.raises(EvictionError, match="h2o budget 64 tokens is larger than the 10-token prompt"):
        _prefill([EvictH2O(budget=64, recent=4)] * 2)


def test_a_window_budget_without_room_beside_the_sinks_is_an_error():
    with pytest.raises(EvictionError, match=r"window budget 0.3 is 3 tokens for a 10-token prompt, which leaves no "
                                            r"room beside the 4 sink tokens"):
        _prefill([EvictWindow(sink=4, budget=0.3)] * 2)


def test_a_snapkv_budget_not_above_its_window_is_an_error():
    with pytest.raises(EvictionError, match=r"snapkv budget 0.5 is 5 tokens for a 10-token prompt, not more than its "
                                            r"8-token observation window"):
        _prefill([EvictSnapKV(budget=0.5, window=8)] * 2)


def test_two_scoring_policies_in_one_layer_are_refused():
    with pytest.raises(EvictionError, match="KV heads of one layer use different attention scores"):
        EvictingLayerCache(3, [make_policy(EvictH2O()), make_policy(EvictKeyformer())])


def test_decode_without_a_mask_attends_every_kept_slot():
    """No mask (a model that passes none) is the same as a mask allowing every token (was NaN with GQA)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 41, 16, generator=gen), torch.randn(1, 2, 41, 16, generator=gen), \
        torch.randn(1, 2, 41, 16, generator=gen)
    everything = torch.ones(1, 1, 41, 41, dtype=torch.bool).tril()
    outs = []
    for prompt_mask, step_mask in ((None, None), (everything[..., :40, :40], everything[..., 40:, :])):
        cache = EvictingLayerCache(0, [make_policy(EvictH2O(budget=0.5))] * 2)
        cache.compress_prompt(q[:, :, :40], k[:, :, :40], v[:, :, :40], prompt_mask, scale=0.25, softcap=0.0,
                              is_causal=prompt_mask is None)
        outs.append(cache.decode(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], step_mask, scale=0.25, softcap=0.0))
    assert not outs[0].isnan().any()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
