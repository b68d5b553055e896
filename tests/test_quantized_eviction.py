"""Eviction with quantization (kvfx.quantization.evicting): the composite cache against the paper-faithful eviction
reference (kvfx.eviction.faithful) fed, at every step, the tokens as the composite stores them (dequantized), so
that both attend the same values and the test checks the eviction decisions and the attention exactly; its bytes;
the compiled model end to end; what it refuses.

Tolerances: float32 on both sides, the same values attended; only the order of float32 sums differs: 1e-5.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvfx.quantization.evicting as evicting
from kvfx.eviction import make_policy
from kvfx.eviction.faithful import FaithfulAttention
from kvfx.eviction.slot_cache import EvictingLayerCache
from kvfx.quantization import make_quantized_cache
from kvfx.quantization.evicting import QuantizedEvictingLayerCache
from kvfx.spec import EvictH2O, EvictKeyformer, EvictNone, EvictSnapKV, EvictWindow, QuantizeGEAR, QuantizeKIVI
from kvfx.state import KvfxCacheError

KIVI = QuantizeKIVI(bits=4, group=8, residual=16)
KIVI_2BIT = QuantizeKIVI(bits=2, group=16, residual=16)
GEAR = QuantizeGEAR(bits=2, group=16, residual=16, rank=2, prefill_rank=4, outliers=0.3)
EVICTS = [EvictH2O(budget=0.5, recent=0.25), EvictKeyformer(budget=0.5, recent=0.3), EvictSnapKV(budget=16, window=4),
          EvictWindow(sink=2, budget=12)]


def composite(configs, quantize, layer=0) -> QuantizedEvictingLayerCache:
    return QuantizedEvictingLayerCache(layer, [make_policy(c) for c in configs], make_quantized_cache(layer, quantize))


def run_against_faithful(configs, quantize, *, batch=2, q_heads=4, kv_heads=2, head_dim=16, prompt=40, steps=30,
                         pads=(0, 5), seed=0):
    """Prompt + ``steps`` decode steps through the composite; at each step the faithful reference gets the whole
    cache as the composite attends it (its live slots, dequantized, at their positions). Asserts equal outputs and
    equal kept positions after every step."""
    gen = torch.Generator().manual_seed(seed)
    total = prompt + steps
    q = torch.randn(batch, q_heads, total, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, total, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, total, head_dim, generator=gen)
    real = torch.ones(batch, total, dtype=torch.bool)
    for row, pad in enumerate(pads[:batch]):
        real[row, :pad] = False

    def mask(start, stop):
        qpos, kpos = torch.arange(start, stop).view(-1, 1), torch.arange(stop).view(1, -1)
        return (kpos <= qpos)[None, None] & real[:, None, None, :stop]  # [B, 1, Tq, Tk]

    cache = composite(configs, quantize)
    reference = FaithfulAttention(0, configs)
    scale = 1 / math.sqrt(head_dim)
    cache.compress_prompt(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], mask(0, prompt), scale=scale,
                          softcap=0.0, is_causal=False)
    reference(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], mask(0, prompt), scale=scale)
    assert cache.kept_positions() == reference.kept_positions(), "after the prompt"

    attended = {}
    real_step = evicting.slot_decode_step_reference

    def spy(query, store, *args, **kwargs):  # what the composite attends: its slots before this step evicts
        attended.update(k=store.k.clone(), v=store.v.clone(), pos=store.pos.clone())
        return real_step(query, store, *args, **kwargs)

    evicting.slot_decode_step_reference = spy
    try:
        for t in range(prompt, total):
            m = mask(t, t + 1)
            out = cache.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], m, scale=scale, softcap=0.0)
            pos = attended["pos"]
            # positions 0 .. t, and a scratch column t + 1 that dead slots are written to
            full_k = torch.zeros(batch, kv_heads, t + 2, head_dim)
            full_v = torch.zeros(batch, kv_heads, t + 2, head_dim)
            index = torch.where(pos >= 0, pos, t + 1)[..., None].expand(-1, -1, -1, head_dim)
            full_k.scatter_(2, index, attended["k"])
            full_v.scatter_(2, index, attended["v"])
            expected = reference(q[:, :, t:t + 1], full_k[:, :, :-1], full_v[:, :, :-1], m, scale=scale)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5,
                                       msg=lambda text: f"decode step {t - prompt}: {text}")
            assert cache.kept_positions() == reference.kept_positions(), f"after decode step {t - prompt}"
    finally:
        evicting.slot_decode_step_reference = real_step
    return cache


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(evict=st.sampled_from(EVICTS), quantize=st.sampled_from([KIVI, KIVI_2BIT, GEAR]),
       prompt=st.integers(24, 48), steps=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_composite_equals_faithful_eviction_over_the_quantized_tokens(evict, quantize, prompt, steps, seed):
    cache = run_against_faithful([evict, evict], quantize, prompt=prompt, steps=steps, seed=seed)
    # the store holds every slot ever written: the kept prompt tokens, then one per decode step
    kept_prompt = cache.slots - steps
    assert sum(cache.quantized.quantized_tokens) + sum(cache.quantized.residual_tokens) == 2 * cache.slots
    assert kept_prompt <= prompt


def test_per_head_policies_with_quantization():
    run_against_faithful([EvictH2O(budget=0.5, recent=0.25), EvictNone()], KIVI, prompt=32, steps=20)


def test_quantization_changes_what_is_attended():
    """The composite really attends quantized tokens: at 2 bits its outputs differ from plain eviction's."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 41, 16, generator=gen) for _ in range(3))
    k = k[:, :1].contiguous()
    v = v[:, :1].contiguous()
    outs = []
    mask = torch.ones(1, 1, 41, 41, dtype=torch.bool).tril()
    for cache in (composite([EvictH2O(budget=0.5)], KIVI_2BIT),
                  EvictingLayerCache(0, [make_policy(EvictH2O(budget=0.5))])):
        cache.compress_prompt(q[:, :, :40], k[:, :, :40], v[:, :, :40], mask[..., :40, :40], scale=0.25, softcap=0.0,
                              is_causal=False)
        outs.append(cache.decode(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], mask[..., 40:, :], scale=0.25, softcap=0.0))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_bytes_are_the_quantized_budget_plus_decode_slots():
    cache = run_against_faithful([EvictH2O(budget=0.5, recent=0.25)] * 2, KIVI, prompt=64, steps=9, pads=(0, 0))
    b, h, d = 2, 2, 16
    slots = 32 + 9  # the budget of a 64-token prompt, then every decode token
    assert cache.slots == slots
    codes = b * h * slots * d * KIVI.bits // 8  # keys and values alike, as far as quantized
    qk, qv = cache.quantized.quantized_tokens
    rk, rv = cache.quantized.residual_tokens
    expected = (b * h * (qk + qv) * d * KIVI.bits // 8  # codes
                + 2 * 2 * b * h * (qk // KIVI.group * d + qv * d // KIVI.group)  # fp16 scale + offset
                + 4 * b * h * (rk + rv) * d  # float32 residual tokens (the inputs' dtype)
                + b * h * slots * (8 + 4))  # position (int64) and score (float32) per slot
    assert cache.used_bytes == expected
    assert codes < b * h * slots * d * 4  # against float32 keys alone


def test_compiled_model_generates_with_h2o_and_kivi():
    from families import tiny_model

    import kvfx

    model = tiny_model("llama", "sdpa")
    spec = {"version": 1, "default": {"evict": {"method": "h2o", "budget": 0.5},
                                      "quantize": dataclasses.asdict(QuantizeKIVI(bits=4, group=8, residual=16))}}
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    model.forward = torch.compile(model.forward, backend="kvfx", options={"spec": spec})
    out = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 60)
    state = kvfx.REGISTRY.lookup(out.past_key_values.layers[0].keys)
    caches = list(state.layers.values())
    assert caches and all(isinstance(cache, QuantizedEvictingLayerCache) for cache in caches)
    for cache in caches:  # h2o's budget of the 48-token prompt stays attended; every slot ever written is stored
        assert (cache.live == 24).all()
        assert cache.slots == 24 + 11


def test_refusals():
    with pytest.raises(KvfxCacheError, match="sliding-window layer"):
        QuantizedEvictingLayerCache(0, [make_policy(EvictH2O())], make_quantized_cache(0, KIVI), keep_last=8)
    with pytest.raises(KvfxCacheError, match="positions: compact"):
        composite([EvictWindow(sink=2, budget=12, positions="compact")], KIVI)
    cache = composite([EvictH2O()], KIVI)
    with pytest.raises(KvfxCacheError, match="decode before the prompt"):
        cache.decode(*(torch.zeros(1, 1, 1, 16) for _ in range(3)), None, scale=1.0, softcap=0.0)
