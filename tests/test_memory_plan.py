"""The memory plan against what kvfx really allocates (issue 6, acceptance 4).

For every implemented policy (one per layer of a tiny 8-layer Llama, plus a sliding-window model) kvfx compiles the
model and runs ``generate`` on a left-padded batch. After the prompt (``max_new_tokens=1``: no decode step) and after
decoding, per layer: the bytes of the keys, values, positions, scores and compensation state the cache holds must
equal the plan's storage term exactly, and the bytes of every tensor it holds (bookkeeping included) must be within
5% of the plan's total; ``SequenceState.nbytes`` must be within 5% of the plan's total too. The prompt length is
chosen so that decoding crosses a growth step where a cache grows (full layers, razor's keep-everything heads, slot
caches with a keep-everything head). The growth rules themselves are held to the caches one decode step at a time.

Quantization likewise (a second 8-layer Llama: KIVI at 2, 4 and 8 bits, GEAR with and without outliers, H2O and
SnapKV over KIVI/GEAR, a quantized layer whose head keeps everything): there the plan is exact for everything the
cache holds (packed stores, residual buffers, positions, scores and bookkeeping) and equals ``nbytes``; decoding
crosses flushes and store growths. The quantized caches are also driven directly, one decode step at a time, against
the plan's expression.
"""

from __future__ import annotations

import dataclasses

import pytest
import sympy
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

import kvfx
from families import FAMILIES, VOCAB, left_padded_batch, tiny_model
from kvfx import memory_plan
from kvfx.assets import asset
from kvfx.cli import main
from kvfx.eviction import make_policy, ragged_cache, slot_cache
from kvfx.eviction.ragged_cache import RaggedLayerCache
from kvfx.eviction.razor import window_size
from kvfx.eviction.slot_cache import EvictingLayerCache
from kvfx.memory_plan import (B, CHUNK, N, T, ModelShape, PlanError, _razor_window, _slot_capacity, buffer_tokens,
                              decode_steps, grow_full, grow_positions, grow_quantized, grow_ragged, grow_slots,
                              outliers_per_row, plan_memory, quantized_tokens, store_chunk)
from kvfx.quantization import QuantizedLayerCache, make_quantized_cache, storage
from kvfx.quantization.evicting import QuantizedEvictingLayerCache
from kvfx.quantization.storage import QuantizedStore, ResidualBuffer
from kvfx.spec import EvictH2O, EvictRazor, EvictSnapKV, Policy, SpecError
from kvfx.state import GROWTH_CHUNK, LayerCache

PROMPTS = [60, 45]  # T = 60: a full layer's 64-slot chunk overflows at the 5th decode step
NEW_TOKENS = 8  # generate's max_new_tokens after the prompt run: N = 7 tokens written to the cache
STORAGE = ("k", "v", "pos", "score", "comp_k", "comp_v", "comp_n",  # what the plan's storage term counts
           "stores", "residuals", "quantized")  # quantized layers: packed stores and residual buffers

H2O = {"method": "h2o", "budget": 0.5, "recent": 0.5}
# Quantize configs valid at head_dim 16 (2-bit values need group 16: a word's 16 codes in one group), with small
# residuals so that a short decode crosses flushes and store growths; KIVI8's residual 24 gives a 72-token chunk.
KIVI2 = {"method": "kivi", "bits": 2, "group": 16, "residual": 16}
KIVI4 = {"method": "kivi", "bits": 4, "group": 8, "residual": 8}
KIVI8 = {"method": "kivi", "bits": 8, "group": 8, "residual": 24}
GEAR4 = {"method": "gear", "bits": 4, "group": 8, "residual": 16, "rank": 2, "prefill_rank": 4, "outliers": 0.25}
GEAR2 = {"method": "gear", "bits": 2, "group": 16, "residual": 64, "rank": 3, "prefill_rank": 1, "outliers": 0.0}
QUANT_PROMPTS = [62, 50]  # T = 62 (GEAR2 quantizes nothing of it), N = 19: keys cross 64 quantized tokens
QUANT_NEW_TOKENS = 20


def layered_llama():
    """A tiny Llama with 8 layers, 2 KV heads each: one layer per policy in one compiled model."""
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, **{**FAMILIES["llama"], "num_hidden_layers": 8})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    from kvfx.head_profile import profile_heads

    path = tmp_path_factory.mktemp("profiles") / "tiny-llama.json"
    return profile_heads(layered_llama(), model_name="tiny-llama-8", length=8, progress=False).save(path)


def razor_evict(profile) -> dict:
    return {"method": "razor", "profile": str(profile), "sink": 1, "min_window": 3, "compress_ratio": 4.0,
            "echo_ratio": 0.2, "induction_ratio": 0.2}


def layered_spec(profile) -> dict:
    """Layer by layer: full, window, h2o, keyformer, snapkv, h2o beside a keep-everything head (a slot cache that
    grows), then razor (the tiny profile's retrieval heads at 20%/20% include layer 7's head 0, not layer 6's)."""
    layers = [{"method": "window", "sink": 2, "budget": 0.5}, H2O,
              {"method": "keyformer", "budget": 0.4, "recent": 0.3},
              {"method": "snapkv", "budget": 20, "window": 3, "pool": 3}, H2O]
    overrides = [{"layers": index + 1, "evict": evict} for index, evict in enumerate(layers)]
    overrides += [{"layers": 5, "heads": 0, "evict": {"method": "none"}},
                  {"layers": "6-7", "evict": razor_evict(profile)}]
    return {"version": 1, "default": {"evict": {"method": "none"}}, "overrides": overrides}


def held_bytes(cache, names=None) -> int:
    """Bytes of the tensors a layer cache holds (its attributes, the keep rule's fields, a quantized cache's stores
    and residual buffers; only ``names`` if given), each storage once."""
    storages = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[(storage.data_ptr(), str(value.device))] = storage.nbytes()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                visit(getattr(value, field.name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (QuantizedLayerCache, QuantizedStore, ResidualBuffer)):
            for item in vars(value).values():
                visit(item)

    for name, value in vars(cache).items():
        if names is None or name in names:
            visit(value)
    return sum(storages.values())


def assert_plan_holds(model, plan, grows: set[int], describe, prompts=PROMPTS, decode_tokens=NEW_TOKENS):
    """Generate after the prompt only, then with decode steps; each layer's bytes against the plan (quantized
    layers: exactly, everything they hold)."""
    ids, mask = left_padded_batch(prompts, seed=1)
    totals, states = [], []
    for new_tokens in (1, decode_tokens):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        state = kvfx.REGISTRY.lookup(out.past_key_values.layers[0].keys)
        values = {B: len(prompts), T: ids.shape[1], N: decode_steps(new_tokens)}
        assert sorted(state.layers) == list(range(plan.shape.num_layers))
        for layer, cache in state.layers.items():
            where = f"layer {layer} ({describe(layer)}), {new_tokens} new tokens"
            expected = plan.layers[layer]
            assert held_bytes(cache, STORAGE) == expected.storage.subs(values), where  # exact
            held, predicted = held_bytes(cache), int(expected.total.subs(values))
            assert abs(held - predicted) <= 0.05 * held, f"{where}: holds {held} bytes, plan {predicted}"
            if expected.cache.startswith("quantized"):  # nothing host-side or approximate: exact, and nbytes too
                assert held == predicted and cache.nbytes == expected.storage.subs(values), where
        predicted = plan.evaluate(len(prompts), ids.shape[1], new_tokens)
        assert abs(state.nbytes - predicted.total) <= 0.05 * state.nbytes, f"{new_tokens} new tokens"
        totals.append(predicted.layers)
        states.append(state)
    for layer, (after_prompt, after_decoding) in enumerate(zip(*totals)):
        if layer in grows:
            assert after_decoding > after_prompt, f"layer {layer} ({describe(layer)}) should grow"
        else:  # eviction and sliding-window layers stay flat however long generation runs
            assert after_decoding - after_prompt < 0.05 * after_prompt, f"layer {layer} ({describe(layer)})"
    return states


def test_plan_equals_what_kvfx_allocates_for_every_policy(tiny_profile):
    spec = layered_spec(tiny_profile)
    torch._dynamo.reset()
    model = layered_llama()
    plan = plan_memory(spec, model.config)  # the dtype from the config: float32
    assert plan.shape.dtype == torch.float32
    assert [layer.cache for layer in plan.layers] == ["full"] + ["slots"] * 5 + ["ragged"] * 2
    model.forward = torch.compile(model.forward, backend="kvfx",
                                  options={"spec": spec, "compiler": "eager", "verbose": False})
    methods = lambda layer: "/".join(sorted({p.evict.method for p in plan.plan.layer_policies(layer)}))  # noqa: E731
    _, state = assert_plan_holds(model, plan, grows={0, 5, 7}, describe=methods)
    for layer, note in ((6, "no retrieval heads"), (7, "keep everything: head 0")):  # as kvfx picks them
        assert plan.layers[layer].note == note
        keep = [head for head, kept in enumerate(state.layers[layer].keep_all.tolist()) if kept]
        assert keep == ([0] if layer == 7 else [])


def test_plan_equals_what_kvfx_allocates_for_sliding_window_layers():
    spec = {"version": 1, "default": {"evict": {"method": "none"}},
            "overrides": [{"layers": 1, "evict": {"method": "window", "sink": 1, "budget": 8}}]}
    torch._dynamo.reset()
    model = tiny_model("mistral", "sdpa")  # sliding_window 5: transformers keeps the last 4 tokens
    plan = plan_memory(spec, model.config)
    assert plan.shape.keep_last == (4, 4)
    model.forward = torch.compile(model.forward, backend="kvfx",
                                  options={"spec": spec, "compiler": "eager", "verbose": False})
    _, state = assert_plan_holds(model, plan, grows=set(), describe=lambda layer: ["full", "window"][layer])
    assert state.layers[0].keep_last == 4


def quantized_spec() -> dict:
    """Layer by layer: KIVI at 2, 4 and 8 bits, GEAR 4-bit with outliers, GEAR 2-bit without (residual 64: none of
    the prompt is quantized, its store is empty until decode), H2O over KIVI 4, H2O beside a keep-everything head
    over KIVI 2 (every prompt token kept), SnapKV over GEAR 4."""
    snapkv = {"method": "snapkv", "budget": 20, "window": 3, "pool": 3}
    layers = [(None, KIVI2), (None, KIVI4), (None, KIVI8), (None, GEAR4), (None, GEAR2), (H2O, KIVI4), (H2O, KIVI2),
              (snapkv, GEAR4)]
    overrides = [{"layers": layer, "quantize": quantize, **({"evict": evict} if evict else {})}
                 for layer, (evict, quantize) in enumerate(layers)]
    overrides.append({"layers": 6, "heads": 0, "evict": {"method": "none"}})
    return {"version": 1, "default": {"evict": {"method": "none"}}, "overrides": overrides}


def test_plan_equals_what_kvfx_allocates_for_quantization():
    spec = quantized_spec()
    torch._dynamo.reset()
    model = layered_llama()
    plan = plan_memory(spec, model.config)
    assert [layer.cache for layer in plan.layers] == ["quantized"] * 5 + ["quantized slots"] * 3
    model.forward = torch.compile(model.forward, backend="kvfx",
                                  options={"spec": spec, "compiler": "eager", "verbose": False})
    # KIVI8 (72-token chunks) crosses a flush but no growth; every other layer grows a store or its positions
    states = assert_plan_holds(model, plan, grows={0, 1, 3, 4, 5, 6, 7},
                               describe=lambda layer: plan.layers[layer].describe_policy(),
                               prompts=QUANT_PROMPTS, decode_tokens=QUANT_NEW_TOKENS)
    t, n = max(QUANT_PROMPTS), decode_steps(QUANT_NEW_TOKENS)
    kept = {5: t // 2, 6: t, 7: 20}  # H2O's half, every token (a head keeps everything), SnapKV's 20
    for layer in range(8):
        config, prompt = plan.plan.layer_policies(layer)[0].quantize, kept.get(layer, t)
        counts = []
        for state, steps in zip(states, (0, n)):
            cache = state.layers[layer]
            quantized = cache.quantized if isinstance(cache, QuantizedEvictingLayerCache) else cache
            assert isinstance(quantized, QuantizedLayerCache)
            if layer in kept:
                assert isinstance(cache, QuantizedEvictingLayerCache) and cache.slots == prompt + steps
            assert quantized.quantized_tokens == tuple(quantized_tokens(config, kind, prompt + steps)
                                                       for kind in ("keys", "values")), (layer, steps)
            counts.append(quantized.quantized_tokens[0])
        assert counts[1] > counts[0], f"layer {layer}: decoding should flush a block of keys"


# ---- the growth rules, one decode step at a time ---------------------------------------------------------------


def test_chunk_is_the_caches_growth_chunk():
    assert CHUNK == GROWTH_CHUNK == slot_cache.GROWTH_CHUNK == ragged_cache.GROWTH_CHUNK == storage.GROWTH_CHUNK


@pytest.mark.parametrize("prompt,keep_last", [(1, 0), (64, 0), (130, 0), (40, 70), (100, 7)])
def test_full_layer_capacity_follows_grow_full(prompt, keep_last):
    cache = LayerCache(keep_last)
    cache.append(torch.zeros(1, 1, prompt, 1), torch.zeros(1, 1, prompt, 1))
    cache.trim()
    holds = T + N if not keep_last else sympy.Min(T + N, keep_last + 1)
    capacity = grow_full(CHUNK * sympy.ceiling(T / CHUNK), holds)
    for steps in range(300):
        assert cache.k.shape[2] == capacity.subs({T: prompt, N: steps}), f"after {steps} decode steps"
        cache.append(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
        cache.trim()


def test_slot_cache_with_a_keep_everything_head_grows_as_grow_slots():
    prompt, d = 10, 4
    cache = EvictingLayerCache(0, [None, make_policy(EvictH2O(budget=0.5))])
    q, k, v = torch.randn(1, 2, prompt, d), torch.randn(1, 2, prompt, d), torch.randn(1, 2, prompt, d)
    cache.compress_prompt(q, k, v, None, scale=0.5, softcap=0.0, is_causal=True)
    for steps in range(100):
        assert cache.capacity == grow_slots(T + 1, T + N).subs({T: prompt, N: steps}), f"after {steps} steps"
        cache.decode(torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d), None, scale=0.5,
                     softcap=0.0)


def test_ragged_cache_retrieval_regions_grow_as_grow_ragged():
    prompt, d = 40, 4
    config = EvictRazor(profile="unused.json", sink=1, min_window=3, compress_ratio=4.0)
    cache = RaggedLayerCache(0, [True, False], config)
    q, k, v = torch.randn(1, 2, prompt, d), torch.randn(1, 2, prompt, d), torch.randn(1, 2, prompt, d)
    cache.compress_prompt(q, k, v, None)
    window = int(_razor_window(config).subs(T, prompt))
    for steps in range(100):
        slots = grow_ragged(T, T + N).subs({T: prompt, N: steps}) + config.sink + window
        assert cache.k.shape[1] == slots, f"after {steps} decode steps"
        cache.decode(torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d), None, scale=0.5,
                     softcap=0.0)


def one_layer_plan(quantize: dict, evict: dict | None = None, heads: int = 2, head_dim: int = 16):
    shape = ModelShape(num_layers=1, num_kv_heads=heads, head_dim=head_dim, value_head_dim=head_dim,
                       dtype=torch.float32, keep_last=(0,))
    return plan_memory({"version": 1, "default": {"quantize": quantize, "evict": evict or {"method": "none"}}}, shape)


def drive(cache, plan, prompt: int, steps: int, heads: int = 2, d: int = 16, check=None):
    """Write a random prompt (batch 2) to ``cache``, then decode ``steps`` tokens; after the prompt and after each
    step the bytes it allocates must be the plan's storage term exactly."""
    gen = torch.Generator().manual_seed(prompt)
    q, k, v = (torch.randn(2, heads, prompt, d, generator=gen) for _ in range(3))
    cache.compress_prompt(q, k, v, None, scale=0.25, softcap=0.0, is_causal=True)
    expected = plan.layers[0].storage
    for step in range(steps + 1):
        assert cache.nbytes == expected.xreplace({B: 2, T: prompt, N: step}), f"after {step} decode steps"
        if check is not None:
            check(step)
        if step < steps:
            q, k, v = (torch.randn(2, heads, 1, d, generator=gen) for _ in range(3))
            cache.decode(q, k, v, None, scale=0.25, softcap=0.0)


@pytest.mark.parametrize("quantize,prompt,steps", [
    (KIVI2, 5, 140),  # nothing quantized at the prompt; keys grow 64 -> 128 -> 192
    (KIVI4, 64, 90),
    (KIVI8, 40, 130),  # 72-token chunks
    ({"method": "kivi", "bits": 8, "group": 4, "residual": 100}, 1, 110),  # a 100-token chunk, a 200-token buffer
    (GEAR4, 100, 50),  # outliers, rank padded to prefill_rank 4
    (GEAR2, 1, 140),  # blocks of 64, rank padded to 3, no outliers
])
def test_quantized_cache_bytes_follow_the_plan_step_by_step(quantize, prompt, steps):
    plan = one_layer_plan(quantize)
    config = plan.plan.layer_policies(0)[0].quantize
    cache = make_quantized_cache(0, config)
    for kind in ("keys", "values"):  # the planner's sizes are the quantizers' own
        quantizer = cache.quantizers[kind]
        assert (store_chunk(config), buffer_tokens(config, kind)) == (quantizer.chunk, quantizer.buffer_tokens)

    def check(step):
        assert cache.quantized_tokens == tuple(quantized_tokens(config, kind, prompt + step)
                                               for kind in ("keys", "values"))

    drive(cache, plan, prompt, steps, check=check)
    if config.method == "gear":
        for kind in ("keys", "values"):
            store = cache.stores[kind]
            assert store.outliers_per_row == outliers_per_row(config, kind, 16)
            assert store.rank == max(config.rank, config.prefill_rank)
        assert outliers_per_row(config, "keys", 16) == (2 if config.outliers else 0)  # 8-token rows: 1 a side
    assert grow_quantized(0, 1, store_chunk(config)) == store_chunk(config)


@pytest.mark.parametrize("evict,quantize,prompt,steps", [
    (H2O, KIVI4, 12, 80),  # 6 kept: positions grow 6 -> 70 -> 134
    ({"method": "window", "sink": 2, "budget": 10}, GEAR4, 40, 60),
    ({"method": "snapkv", "budget": 8, "window": 3, "pool": 3}, KIVI2, 30, 40),
])
def test_quantized_evicting_cache_bytes_follow_the_plan_step_by_step(evict, quantize, prompt, steps):
    plan = one_layer_plan(quantize, evict)
    policies = plan.plan.layer_policies(0)
    cache = QuantizedEvictingLayerCache(0, [make_policy(p.evict) for p in policies],
                                        make_quantized_cache(0, policies[0].quantize))
    drive(cache, plan, prompt, steps)


def test_quantized_evicting_cache_with_a_keep_everything_head_keeps_the_whole_prompt():
    spec = {"version": 1, "default": {"evict": H2O, "quantize": KIVI4},
            "overrides": [{"layers": 0, "heads": 0, "evict": {"method": "none"}}]}
    shape = ModelShape(num_layers=1, num_kv_heads=2, head_dim=16, value_head_dim=16, dtype=torch.float32,
                       keep_last=(0,))
    plan = plan_memory(spec, shape)
    policies = plan.plan.layer_policies(0)
    cache = QuantizedEvictingLayerCache(0, [make_policy(p.evict) for p in policies],
                                        make_quantized_cache(0, policies[0].quantize))
    drive(cache, plan, 20, 30)
    assert cache.slots == 20 + 30


def test_windows_and_budgets_are_the_policies_own_sizes():
    razors = [EvictRazor(profile="p.json", min_window=m, compress_ratio=r) for m in (1, 3, 256) for r in (1, 2.5, 5)]
    budgets = [EvictH2O(budget=b) for b in (0.2, 0.5, 1.0, 0.05, 7)] + [EvictSnapKV(budget=0.3, window=2)]
    for prompt in (1, 2, 5, 9, 64, 255, 256, 1000, 1283, 4099):
        for config in razors:
            assert _razor_window(config).subs(T, prompt) == window_size(config, prompt), (config, prompt)
        for config in budgets:
            expected = make_policy(config).capacity(prompt)
            assert _slot_capacity(make_policy(config)).subs(T, prompt) == expected, (config, prompt)


def test_growth_functions_stay_symbolic_until_given_numbers():
    assert grow_slots(T + 1, T + N).subs(N, 0) == T + 1  # no decode step: no growth, still a closed form
    assert grow_ragged(T, T + N).subs(N, 0) == T
    assert grow_full(64, 65) == 128 and grow_full(128, 129) == 192 and grow_full(64, 64) == 64
    assert isinstance(grow_full(CHUNK * sympy.ceiling(T / CHUNK), T + N), grow_full)
    assert decode_steps(0) == 0 and decode_steps(1) == 0 and decode_steps(256) == 255
    assert grow_quantized(0, 1, 72) == 72 and grow_quantized(72, 73, 72) == 144 and grow_quantized(0, 0, 64) == 0
    assert grow_quantized(576, 577, 64) == 704  # 576 + 576 // 8 = 648, rounded up to 64
    assert grow_positions(31, 32) == 95 and grow_positions(95, 96) == 159
    assert grow_positions(600, 601) == 728  # 600 // 8 = 75 slots, rounded up to 128
    assert isinstance(grow_quantized(64 * sympy.ceiling(T / 64), T + N, 64), grow_quantized)
    assert grow_positions(T, T + N).subs(N, 0) == T


# ---- totals, the command line and errors -----------------------------------------------------------------------


def test_full_cache_baseline_and_ratio_by_hand():
    shape = ModelShape(num_layers=4, num_kv_heads=8, head_dim=128, value_head_dim=128, dtype=torch.bfloat16,
                       keep_last=(0, 0, 0, 0))
    spec = {"version": 1, "default": {"evict": {"method": "window", "sink": 4, "budget": 1024}}}
    totals = plan_memory(spec, shape).evaluate(batch=2, tokens=8192, new_tokens=101)
    full = 4 * 2 * 8 * 8292 * 2 * 128 * 2  # layers x B x Hkv x (T + N) x (k + v) x D x bf16
    slots = 4 * 2 * 8 * 1025 * (2 * 128 * 2 + 8 + 4)  # budget + 1 slots of k, v, int64 position, fp32 score
    bookkeeping = 4 * (4 * 8 * 2 * 8 + 2 * 8 * 2 + 2 * 8 * 2 * 8 + 2 * 8)
    assert (totals.full_cache, totals.storage, totals.total) == (full, slots, slots + bookkeeping)
    assert totals.ratio == pytest.approx((slots + bookkeeping) / full, rel=1e-12)


def test_quantized_layer_by_hand():
    shape = ModelShape(num_layers=1, num_kv_heads=8, head_dim=128, value_head_dim=128, dtype=torch.bfloat16,
                       keep_last=(0,))
    spec = {"version": 1, "default": {"quantize": {"method": "kivi", "bits": 4, "group": 32, "residual": 128}}}
    plan = plan_memory(spec, shape)
    after_prompt, after_decoding = (plan.evaluate(batch=2, tokens=8192, new_tokens=m) for m in (1, 201))
    # keys: 8192 quantized at the prompt (capacity 8192), 8320 after 200 steps -> max(8193, 8192 + 1024) = 9216;
    # values: 8192 - 128 = 8064 (capacity 8064), then 8264 -> 8064 + 1008 = 9072, rounded up to 128: 9088.
    # Per token 4-bit codes 64 bytes; fp16 scale + offset: keys 128 channels per 32 tokens, values 4 groups a token.
    buffers = 2 * 8 * (128 + 256) * 128 * 2  # bf16 residual buffers: 128 key tokens, 256 value tokens
    key_bytes = lambda capacity: 2 * 8 * capacity * (64 + 2 * 2 * 128 // 32)  # noqa: E731
    value_bytes = lambda capacity: 2 * 8 * capacity * (64 + 2 * 2 * 4)  # noqa: E731
    assert after_prompt.total == key_bytes(8192) + value_bytes(8064) + buffers
    assert after_decoding.total == key_bytes(9216) + value_bytes(9088) + buffers
    assert after_decoding.storage == after_decoding.total  # no bookkeeping beside the stores and buffers
    assert after_decoding.full_cache == 2 * 8 * 8392 * 2 * 128 * 2


def test_cli_prints_expressions_totals_and_ratio(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", "sdpa").config.save_pretrained(folder)
    spec = tmp_path / "h2o.yaml"
    spec.write_text("version: 1\ndefault: {evict: {method: h2o, budget: 0.25}}\n"
                    "overrides: [{layers: 0, evict: {method: none}}]\n")
    result = CliRunner().invoke(main, ["plan", str(folder), str(spec), "--batch", "3", "--tokens", "100",
                                       "--new-tokens", "40", "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    totals = plan_memory(str(spec), str(folder), "float16").evaluate(3, 100, 40)
    full_layer = 3 * 2 * 192 * 2 * 16 * 2  # B x Hkv x grow_full(128, 139) = 192 slots x (k + v) x D x fp16
    assert totals.layers[0] == full_layer
    text = result.output
    assert "layer 0: evict=none quantize=none" in text and "128*B*grow_full(64*ceiling(T/64), N + T)" in text
    assert "layer 1: evict=h2o(budget=0.25, recent=0.5) quantize=none" in text
    assert "152*B*(Max(1, floor(T/4)) + 1)" in text  # Hkv x (k + v in fp16 + int64 position + fp32 score) x slots
    assert f" {totals.total:,} bytes" in text and f" {totals.full_cache:,} bytes" in text
    assert totals.full_cache == 2 * 3 * 2 * 139 * 2 * 16 * 2  # N = 39 written tokens: T + N = 139
    assert f"ratio:      {totals.ratio:.4f} of the full cache" in text


def test_cli_plans_razor_on_codelm_with_the_committed_profile():
    result = CliRunner().invoke(main, ["plan", str(asset("codelm-27m")), "examples/specs/razor.yaml",
                                       "--tokens", "2048", "--new-tokens", "1"])
    assert result.exit_code == 0, result.output
    assert "layer 6: " in result.output and "[keep everything: head 0]" in result.output
    assert "layer 4: " in result.output and "[keep everything: head 1]" in result.output
    assert "grow_ragged(T, N + T)" in result.output


@pytest.mark.parametrize("spec", ["kivi", "gear", "h2o_kivi"])
def test_cli_plans_quantization_on_codelm(spec):
    result = CliRunner().invoke(main, ["plan", str(asset("codelm-27m")), f"examples/specs/{spec}.yaml",
                                       "--batch", "2", "--tokens", "2048", "--new-tokens", "300"])
    assert result.exit_code == 0, result.output
    text = result.output
    plan = plan_memory(f"examples/specs/{spec}.yaml", str(asset("codelm-27m")))
    totals = plan.evaluate(2, 2048, 300)
    assert f" {totals.total:,} bytes" in text and totals.ratio < 0.5
    for layer in plan.layers:  # the quantize part of each layer's policy, and its schedule
        assert layer.describe_policy() in text
        if layer.cache.startswith("quantized"):
            assert "quantize=none" not in layer.describe_policy() and "stores grow in 128-token chunks" in layer.note
    assert "grow_quantized(c, n, k) = c if c >= n, else grow_quantized(k*ceiling(max(c + 1, c + c//8)/k), n, k)" in text
    if spec == "kivi":
        assert "layers 0-7: evict=none quantize=kivi(bits=2, group=32, residual=128)" in text
        assert "values token by token past 128" in text
    if spec == "gear":
        assert "quantize=gear(bits=4, group=32, residual=128, rank=2, outliers=0.02, prefill_rank=4)" in text
        assert "low rank 4" in text
    if spec == "h2o_kivi":  # layers 0 and 7 keep everything (quantized), layer 1 evicts in bf16, the rest both
        assert [layer.cache for layer in plan.layers] == (["quantized", "slots"] + ["quantized slots"] * 5
                                                          + ["quantized"])
        assert "grow_positions(c, n) = c if c >= n, else grow_positions(c + 64*ceiling(max(1, c//8)/64), n)" in text


def test_a_method_the_planner_does_not_model_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(memory_plan, "PLANNED", {**memory_plan.PLANNED, "quantize": {"none", "kivi"}})
    with pytest.raises(SpecError, match="quantize.method: 'gear' is not implemented in the memory planner yet"):
        plan_memory("examples/specs/gear.yaml", str(asset("codelm-27m")))
    result = CliRunner().invoke(main, ["plan", str(asset("codelm-27m")), "examples/specs/gear.yaml"])
    assert result.exit_code == 1 and "'gear' is not implemented in the memory planner yet" in result.output


def test_quantization_refusals_are_kvfx_refusals(tiny_profile):
    config = layered_llama().config  # head_dim 16

    def spec(default, *overrides):
        return {"version": 1, "default": default, "overrides": list(overrides)}

    with pytest.raises(SpecError, match="layer 3: a quantized layer takes one quantize config for all its KV heads"):
        plan_memory(spec({"quantize": KIVI4}, {"layers": 3, "heads": 1, "quantize": KIVI2}), config)
    with pytest.raises(SpecError, match="layer 2: a quantized layer takes one quantize config .* none on KV heads"):
        plan_memory(spec({}, {"layers": 2, "heads": 0, "quantize": KIVI4}), config)
    with pytest.raises(SpecError, match="layer 0: razor combined with quantization .* is not supported yet"):
        plan_memory(spec({"evict": razor_evict(tiny_profile), "quantize": KIVI4}), config)
    with pytest.raises(SpecError, match="layer 0: window eviction with positions: compact .* quantized keys"):
        plan_memory(spec({"evict": {"method": "window", "budget": 0.5, "positions": "compact"}, "quantize": KIVI4}),
                    config)
    with pytest.raises(SpecError, match="layer 0: KV heads of one layer use different attention scores"):
        plan_memory(spec({"evict": H2O, "quantize": KIVI4},
                         {"layers": 0, "heads": 1, "evict": {"method": "keyformer"}}), config)
    with pytest.raises(SpecError, match=r"layer 0: quantize kivi\(bits=2, group=32, residual=128\) cannot quantize "
                                        "the values .* group 32 must divide head_dim 16"):
        plan_memory("examples/specs/kivi.yaml", config)
    with pytest.raises(SpecError, match="residual 24 is GEAR's low-rank block and must be a multiple of 16"):
        plan_memory(spec({"quantize": {**GEAR4, "residual": 24}}), config)
    mistral = tiny_model("mistral", "sdpa").config  # sliding window 5: transformers keeps 4 tokens
    with pytest.raises(SpecError, match="layer 0: eviction .* with quantization on a sliding-window layer is not"):
        plan_memory(spec({"evict": H2O, "quantize": KIVI4}), mistral)
    plan = plan_memory(spec({"quantize": KIVI4}), mistral)
    assert plan.evaluate(2, 3, 3).total > 0 and plan.evaluate(2, 60, 1).total > 0  # within the window; no decode
    with pytest.raises(SpecError, match="layer 0: this sliding-window layer keeps only its last 4 tokens .* quantized "
                                        "caches do not slide yet"):
        plan.evaluate(2, 3, 4)


def test_plan_equals_what_kvfx_allocates_for_a_quantized_sliding_window_layer():
    spec = {"version": 1, "default": {"quantize": KIVI4}, "overrides": [{"layers": 1, "quantize": {"method": "none"}}]}
    torch._dynamo.reset()
    model = tiny_model("mistral", "sdpa")
    plan = plan_memory(spec, model.config)
    assert [layer.cache for layer in plan.layers] == ["quantized", "full"]
    assert "decodes while T + N <= 5" in plan.layers[0].note
    model.forward = torch.compile(model.forward, backend="kvfx",
                                  options={"spec": spec, "compiler": "eager", "verbose": False})
    assert_plan_holds(model, plan, grows=set(), describe=lambda layer: ["kivi", "full"][layer], prompts=[3, 2],
                      decode_tokens=3)  # as far as kvfx serves it: the prompt and 2 decode steps fill the window
    ids, mask = left_padded_batch([3, 2], seed=1)
    with pytest.raises(kvfx.KvfxCacheError, match="quantized caches do not slide yet"):  # the planner refuses it too
        model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)


def test_bad_inputs_fail_with_useful_messages(tmp_path, tiny_profile):
    folder = tmp_path / "model"
    config = layered_llama().config
    config.save_pretrained(folder)
    runner = CliRunner()
    result = runner.invoke(main, ["plan", str(folder), str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "missing.yaml: no such spec file" in result.output
    result = runner.invoke(main, ["plan", str(tmp_path), "examples/specs/full.yaml"])
    assert result.exit_code == 1 and "not a model folder (no config.json in it)" in result.output
    with pytest.raises(PlanError, match="dtype 'int8' is not one of bfloat16, float16, float32, auto"):
        plan_memory(None, config, "int8")
    with pytest.raises(PlanError, match="tokens must be an int >= 1, not 0"):
        plan_memory(None, config).evaluate(1, 0)
    h2o_64 = {"version": 1, "default": {"evict": {"method": "h2o", "budget": 64}}}
    with pytest.raises(SpecError, match="layer 0: h2o budget 64 tokens is larger than the 20-token prompt"):
        plan_memory(h2o_64, config).evaluate(1, 20)
    window = {"version": 1, "default": {"evict": {"method": "window", "sink": 4, "budget": 0.1}}}
    with pytest.raises(SpecError, match="layer 0: window budget 0.1 is 3 tokens .* no room beside the 4 sink"):
        plan_memory(window, config).evaluate(1, 30)
    mixed = {"version": 1, "default": {"evict": H2O},
             "overrides": [{"layers": 1, "heads": 0, "evict": razor_evict(tiny_profile)}]}
    with pytest.raises(SpecError, match="layer 1: razor's KV heads share one layout"):
        plan_memory(mixed, config)
    scores = {"version": 1, "default": {"evict": H2O},
              "overrides": [{"layers": 0, "heads": 1, "evict": {"method": "keyformer"}}]}
    with pytest.raises(SpecError, match="layer 0: KV heads of one layer use different attention scores"):
        plan_memory(scores, config)
    codelm = {"version": 1, "default": {"evict": {"method": "razor", "profile": "examples/profiles/codelm-27m.json"}}}
    with pytest.raises(SpecError, match="evict.profile: .*profiles 8 layers x 2 KV heads .*codelm-27m"):
        plan_memory(codelm, tiny_model("llama", "sdpa").config)
    other = layered_llama().config
    other.rope_parameters = {**other.rope_parameters, "rope_theta": 123.0}  # same shape, another model
    with pytest.raises(SpecError, match="evict.profile: .*was made for another model"):
        plan_memory({"version": 1, "default": {"evict": razor_evict(tiny_profile)}}, other)


def test_expressions_are_in_b_t_and_n_only():
    config = tiny_model("llama", "sdpa").config
    for spec in ("full", "window", "h2o", "keyformer", "snapkv"):
        plan = plan_memory(f"examples/specs/{spec}.yaml", config)
        assert plan.total.free_symbols <= {B, T, N}, spec
    for spec in ("kivi", "gear", "h2o_kivi"):  # group 32: a head_dim of 64
        plan = plan_memory(f"examples/specs/{spec}.yaml", asset("codelm-27m"))
        assert plan.total.free_symbols <= {B, T, N}, spec
    assert Policy().describe() in plan_memory(None, config).describe()


def test_model_shapes_from_configs_folders_and_models():
    def shape(family):
        return ModelShape.from_config(AutoConfig.for_model(family, vocab_size=VOCAB, **FAMILIES[family]))

    assert (shape("falcon").num_kv_heads, shape("falcon").head_dim) == (1, 16)  # multi-query
    assert (shape("gpt2").num_layers, shape("gpt2").num_kv_heads) == (2, 4)
    assert shape("gemma2").keep_last == (4, 0)  # alternating sliding (window 5) and full layers
    assert shape("llama").keep_last == (0, 0)
    codelm = ModelShape.from_pretrained(asset("codelm-27m"), "auto")
    assert (codelm.num_layers, codelm.num_kv_heads, codelm.head_dim, codelm.dtype) == (8, 2, 64, torch.bfloat16)
    model = tiny_model("llama", "sdpa", dtype=torch.bfloat16)
    assert plan_memory(None, model).shape.dtype == torch.bfloat16
    assert plan_memory(None, model, "float16").shape.element_size == 2
