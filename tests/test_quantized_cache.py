"""KIVI and GEAR quantized caches (kvfx.quantization): the streaming schedule, the decode step against the kernels'
reference on the cache's own state and against the paper-faithful reference (kvfx.quantization.faithful), the
compiled model against transformers running that reference, the bytes held, and bad inputs.

Tolerances: everything on the CPU is float32. The cache and the faithful reference quantize the same keys and
values (bit-identical: the compiled and the eager model compute them with the same float32 ops) with the same torch
references, so the reconstructed caches are identical and only the order of float32 sums differs: 1e-5 on attention
outputs, 1e-4 on logits after two layers and the LM head (as test_families). The interpreted Triton kernel reads the
same codes with float32 dots: 1e-5. On CUDA (bf16 model) the fused kernel's float16 dots against the float32
reference: 3e-2 on logits, compared while the greedy tokens agree.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvfx
import kvfx.ops
import kvfx.quantization.base as quantization_base
from families import left_padded_batch, tiny_model
from kvfx.kernels.quant_decode_attention import quant_decode_attention, quant_decode_attention_reference
from kvfx.plans import register_plan
from kvfx.evaluate import find_spec_error
from kvfx.quantization import QuantizedLayerCache, make_quantized_cache
from kvfx.quantization.evicting import QuantizedEvictingLayerCache
from kvfx.quantization.faithful import FaithfulQuantizedAttention, register_faithful_quantized_attention
from kvfx.spec import QuantizeGEAR, QuantizeKIVI, Spec
from kvfx.state import KvfxCacheError, SequenceState

KIVI = QuantizeKIVI(bits=4, group=8, residual=16)
KIVI_2BIT = QuantizeKIVI(bits=2, group=16, residual=32)
GEAR = QuantizeGEAR(bits=4, group=8, residual=16, rank=2, prefill_rank=4, outliers=0.3)  # outliers on (D = 16)


def spec_for(config) -> Spec:
    return Spec.from_dict({"version": 1, "default": {"quantize": dataclasses.asdict(config)}})


def expected_counts(config, tokens: int) -> tuple[int, int]:
    """(keys, values) quantized once ``tokens`` tokens were written and flushed (the issue's rules)."""
    r = config.residual
    blocks = tokens // r * r
    return (blocks, max(0, tokens - r)) if config.method == "kivi" else (blocks, blocks)


def random_kv(seed: int, batch: int, kv_heads: int, group: int, length: int, head_dim: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ---- 1. the streaming schedule --------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["kivi", "gear"]), group=st.sampled_from([8, 16]), blocks=st.integers(1, 3),
       prompt=st.integers(1, 70), steps=st.integers(0, 40), seed=st.integers(0, 100))
def test_schedule_quantizes_exactly_the_issues_counts(method, group, blocks, prompt, steps, seed):
    if method == "kivi":
        config = QuantizeKIVI(bits=4, group=group, residual=group * blocks)
    else:  # GEAR's residual is its low-rank block: a multiple of 16
        config = QuantizeGEAR(bits=4, group=group, residual=16 * blocks, rank=2, prefill_rank=3, outliers=0.0)
    q, k, v = random_kv(seed, 1, 2, 2, prompt + steps, 16)
    cache = make_quantized_cache(0, config)
    cache.compress_prompt(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], None)
    assert cache.quantized_tokens == expected_counts(config, prompt)
    assert cache.residual_tokens == tuple(prompt - n for n in expected_counts(config, prompt))
    for t in range(prompt, prompt + steps):
        cache.append_token(k[:, :, t : t + 1], v[:, :, t : t + 1])
        # the step attends the new token at full precision: nothing was flushed yet
        assert cache.quantized_tokens == expected_counts(config, t)
        inputs = cache.decode_inputs()
        assert inputs["kv_len"] == len(cache) == t + 1
        kq, vq = cache.quantized_tokens
        assert torch.equal(inputs["k_res"], k[:, :, kq : t + 1]) and torch.equal(inputs["v_res"], v[:, :, vq : t + 1])
        cache.attend(q[:, :, t : t + 1], None, scale=0.25, softcap=0.0)
        cache.flush()
        assert cache.quantized_tokens == expected_counts(config, t + 1), f"after decode step {t - prompt}"
        assert cache.residual_tokens == tuple(t + 1 - n for n in expected_counts(config, t + 1))
    if method == "gear":  # one low-rank segment for the prompt's blocks, then one per decode block
        prompt_share = prompt // config.residual * config.residual
        decode_blocks = (cache.quantized_tokens[0] - prompt_share) // config.residual
        assert cache.stores["keys"].segments == (prompt_share > 0) + decode_blocks


# ---- 2./3. the decode step: the kernels' reference on its own state, the faithful reference, the kernel ------


def masks(kind: str, pads, q_heads: int, total: int):
    """``mask(start, stop)``: transformers' mask for queries start..stop-1 over keys 0..stop-1 (left padding)."""
    real = torch.ones(len(pads), total, dtype=torch.bool)
    for row, pad in enumerate(pads):
        real[row, :pad] = False
    slopes = torch.tensor([2.0 ** (-(h + 1)) for h in range(q_heads)]).view(1, q_heads, 1, 1)

    def mask(start, stop):
        allowed = torch.arange(stop).view(1, -1) <= torch.arange(start, stop).view(-1, 1)
        allowed = allowed[None, None] & real[:, None, None, :stop]  # [B, 1, Tq, Tk]
        if kind == "bool":
            return allowed
        bias = torch.zeros(1, 1, 1, stop)
        if kind == "alibi":  # a bias that varies by head: the cache's dequantized fallback
            bias = slopes * (torch.arange(stop) - stop + 1).float()
        return torch.where(allowed, bias, torch.finfo(torch.float32).min)

    return mask


@pytest.mark.parametrize("config,mask_kind,softcap", [(KIVI, "bool", 0.0), (KIVI_2BIT, "float", 0.0),
                                                      (GEAR, "bool", 5.0), (GEAR, "alibi", 0.0)])
def test_decode_equals_the_kernel_reference_on_its_state_and_the_faithful_reference(config, mask_kind, softcap):
    batch, kv_heads, group, d, prompt, steps = 2, 2, 2, 16, 21, 40
    q, k, v = random_kv(3, batch, kv_heads, group, prompt + steps, d)
    mask = masks(mask_kind, (0, 3), kv_heads * group, prompt + steps)
    scale = 1 / math.sqrt(d)
    cache = make_quantized_cache(0, config)
    faithful = FaithfulQuantizedAttention(config)
    faithful(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], mask(0, prompt), scale=scale, softcap=softcap)
    cache.compress_prompt(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], mask(0, prompt))
    kernel_steps = {prompt + 5, prompt + steps - 1}
    for t in range(prompt, prompt + steps):
        m = mask(t, t + 1)
        cache.append_token(k[:, :, t : t + 1], v[:, :, t : t + 1])
        inputs = cache.decode_inputs()
        out = cache.attend(q[:, :, t : t + 1], m, scale=scale, softcap=softcap)[:, :, 0]  # [B, Hq, D]
        expected = faithful(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], m, scale=scale,
                            softcap=softcap)[:, :, 0]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=lambda e: f"step {t - prompt}: {e}")
        assert cache.quantized_tokens == faithful.quantized, f"step {t - prompt}"
        if mask_kind != "alibi":  # a per-row mask: the kernels' contract
            row = m[:, 0, -1, :]
            reference = quant_decode_attention_reference(q[:, :, t], mask=row, scale=scale, softcap=softcap,
                                                         **inputs)
            assert torch.equal(out, reference), f"step {t - prompt}"
            if t in kernel_steps:  # the Triton kernel (interpreted on the CPU) on the cache's own state
                fused = quant_decode_attention(q[:, :, t], mask=row, scale=scale, softcap=softcap, **inputs)
                torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
        cache.flush()
    assert min(cache.quantized_tokens) > 0


# ---- 2. the compiled model against transformers running the faithful reference ------------------------


def generate(model, ids, mask, new_tokens):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def compiled(spec, dtype=torch.float32, device="cpu"):
    torch._dynamo.reset()
    model = tiny_model("llama", "sdpa", dtype=dtype).to(device)
    model.forward = torch.compile(model.forward, backend="kvfx",
                                  options={"spec": spec, "compiler": "aot_eager", "verbose": False})
    return model


def faithful_model(spec, dtype=torch.float32, device="cpu"):
    model = tiny_model("llama", "sdpa", dtype=dtype).to(device)
    layers = {i: FaithfulQuantizedAttention(spec.default.quantize) for i in range(model.config.num_hidden_layers)}
    model.config._attn_implementation = register_faithful_quantized_attention(layers)
    return model, layers


@pytest.mark.parametrize("config", [KIVI, GEAR], ids=["kivi", "gear"])
def test_compiled_model_equals_transformers_with_the_faithful_reference(config):
    spec = spec_for(config)
    ids, mask = left_padded_batch([21, 17], seed=1)
    new_tokens = 30
    reference, layers = faithful_model(spec)
    with torch.no_grad():
        expected = generate(reference, ids, mask, new_tokens)
        actual = generate(compiled(spec), ids, mask, new_tokens)
    assert torch.equal(expected.sequences, actual.sequences)
    for step, (e, a) in enumerate(zip(expected.scores, actual.scores, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
    state = kvfx.REGISTRY.states()[-1]
    seen = ids.shape[1] + new_tokens - 1  # the last token is generated, never written
    for index, cache in state.layers.items():
        assert isinstance(cache, QuantizedLayerCache) and len(cache) == seen
        assert cache.quantized_tokens == expected_counts(config, seen), f"layer {index}"
        # the reference's last step attended `seen` tokens, before the cache's last flush
        assert layers[index].quantized == expected_counts(config, seen - 1)


# ---- 4. bytes ----------------------------------------------------------------------------------------


def independent_bytes(config, batch, heads, d, prompt, tokens, element_size, n_out=(0, 0)):
    """Codes (bits per entry) + fp16 scales and offsets + GEAR's terms + the full-precision residual tokens, from
    the layout's rules, after a ``prompt`` and decode steps up to ``tokens``."""
    kq, vq = expected_counts(config, tokens)
    lead = batch * heads
    codes = lead * (kq + vq) * d * config.bits // 8
    params = lead * 2 * 2 * (kq // config.group * d + vq * d // config.group)
    residual = lead * (2 * tokens - kq - vq) * d * element_size
    gear = 0
    if config.method == "gear":
        rank = max(config.rank, config.prefill_rank)  # lr_a and lr_b are zero-padded to the larger rank
        prompt_share = prompt // config.residual * config.residual
        for count, outliers_per_row, outlier_rows in ((kq, n_out[0], kq // config.group * d), (vq, n_out[1], vq)):
            segments = (prompt_share > 0) + (count - prompt_share) // config.residual
            gear += lead * count * rank * 2  # lr_a: fp16 per quantized token
            gear += lead * segments * d * rank * 2  # lr_b: fp16 per segment
            gear += count // config.residual * 4  # lr_seg: int32 per block of `residual` tokens
            gear += lead * outlier_rows * outliers_per_row * (1 + 4)  # uint8 position + float32 value
    return codes + params + residual + gear


@pytest.mark.parametrize("config,n_out", [(QuantizeKIVI(bits=4, group=32, residual=128), (0, 0)),
                                          (QuantizeKIVI(bits=2, group=32, residual=64), (0, 0)),
                                          (QuantizeGEAR(bits=4, group=32, residual=128, outliers=0.1), (2, 6))])
def test_used_bytes_are_the_stored_tensors_and_4_bits_are_a_third_of_bf16(config, n_out):
    batch, heads, d, prompt, steps = 1, 2, 64, 2048 + 40, 3
    q, k, v = random_kv(0, batch, heads, 1, prompt + steps, d, torch.bfloat16)
    cache = make_quantized_cache(0, config)
    cache.compress_prompt(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], None)
    assert cache.used_bytes == independent_bytes(config, batch, heads, d, prompt, prompt, 2, n_out)
    for t in range(prompt, prompt + steps):
        cache.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], None, scale=0.125, softcap=0.0)
    tokens = prompt + steps
    assert cache.used_bytes == independent_bytes(config, batch, heads, d, prompt, tokens, 2, n_out)
    assert cache.nbytes >= cache.used_bytes
    bf16_cache = 2 * batch * heads * tokens * d * 2
    if config.method == "kivi" and config.bits == 4:
        assert cache.used_bytes < 0.35 * bf16_cache
    if config.bits == 2:
        assert cache.used_bytes < 0.25 * bf16_cache


# ---- 5. bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,message", [
    (QuantizeKIVI(bits=4, group=12, residual=48),
     r"layer 0: quantize kivi\(bits=4, group=12, residual=48\) cannot quantize the values of this layer \(head_dim "
     r"16, group 12\): values are quantized per token in groups of channels, so group 12 must divide head_dim 16"),
    (QuantizeKIVI(bits=2, group=8, residual=32),
     r"layer 0: quantize kivi\(bits=2, group=8, residual=32\) cannot quantize the values .*head_dim 16, group 8\): "
     r"value group 8 is below 16, the 2-bit codes of one int32 word"),
    (QuantizeGEAR(bits=4, group=8, residual=24),
     r"layer 0: quantize gear\(.*\) cannot quantize the keys .*head_dim 16, group 8\): residual 24 is GEAR's "
     r"low-rank block and must be a multiple of 16"),
], ids=["group-not-dividing-head-dim", "value-group-below-a-word", "gear-residual"])
def test_bad_quantize_settings_fail_at_compile_time_and_when_the_cache_is_built(config, message):
    ids, mask = left_padded_batch([12, 9], seed=1)
    with pytest.raises(Exception, match=message) as raised, torch.no_grad():  # dynamo wraps the backend's error
        generate(compiled(spec_for(config)), ids, mask, 2)
    assert find_spec_error(raised.value) is not None, raised.value
    q, k, v = random_kv(0, 1, 2, 2, 12, 16)
    with pytest.raises(KvfxCacheError, match=message):  # the cache itself refuses them too (direct use)
        make_quantized_cache(0, config).compress_prompt(q, k, v, None)


def layer_cache_for(spec: dict):
    """kvfx.ops' cache for layer 1 of a 2-layer, 2-KV-head model under ``spec``."""
    plan_id = register_plan(Spec.from_dict(spec), num_layers=2, num_kv_heads=2)
    return kvfx.ops._layer_cache(SequenceState(plan_id), 1, 0)


def test_a_layer_takes_one_quantize_config_and_composes_with_eviction_but_not_razor():
    assert isinstance(layer_cache_for({"version": 1, "default": {"quantize": {"method": "kivi"}}}),
                      QuantizedLayerCache)
    mixed = {"version": 1, "default": {"quantize": {"method": "kivi"}},
             "overrides": [{"layers": "1", "heads": [1], "quantize": {"method": "gear"}}]}
    with pytest.raises(KvfxCacheError, match=r"layer 1: a quantized layer takes one quantize config for all its KV "
                                             r"heads, got kivi\(bits=4, group=32, residual=128\) on KV heads \[0\]; "
                                             r"gear\(.*\) on KV heads \[1\]; quantize whole layers"):
        layer_cache_for(mixed)
    partly = {"version": 1, "overrides": [{"layers": "all", "heads": [0], "quantize": {"method": "kivi"}}]}
    with pytest.raises(KvfxCacheError, match=r"on KV heads \[0\]; none on KV heads \[1\]"):
        layer_cache_for(partly)
    both = {"version": 1, "default": {"evict": {"method": "h2o", "budget": 0.5}, "quantize": {"method": "kivi"}}}
    assert isinstance(layer_cache_for(both), QuantizedEvictingLayerCache)
    razor = {"version": 1,
             "default": {"evict": {"method": "razor", "profile": "p.json"}, "quantize": {"method": "kivi"}}}
    with pytest.raises(KvfxCacheError, match=r"layer 1: razor combined with quantization \(kivi\(.*\)\) is not "
                                             "supported yet"):
        layer_cache_for(razor)


def test_a_sliding_window_layer_is_served_until_a_token_leaves_its_window():
    q, k, v = random_kv(0, 1, 2, 2, 12, 16)
    cache = make_quantized_cache(0, KIVI, keep_last=6)
    cache.compress_prompt(q[:, :, :4], k[:, :, :4], v[:, :, :4], None)
    for t in range(4, 7):  # up to keep_last + 1 tokens, all inside the window
        cache.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], None, scale=0.25, softcap=0.0)
    assert len(cache) == 6
    with pytest.raises(KvfxCacheError, match="layer 0: this sliding-window layer keeps only its last 6 tokens and the "
                                             "sequence already has 7; quantized caches do not slide yet"):
        cache.decode(q[:, :, 7:8], k[:, :, 7:8], v[:, :, 7:8], None, scale=0.25, softcap=0.0)


def test_decode_before_the_prompt_and_a_second_prompt_are_refused():
    q, k, v = random_kv(0, 1, 2, 2, 4, 16)
    cache = make_quantized_cache(2, GEAR)
    with pytest.raises(KvfxCacheError, match="layer 2: decode before the prompt"):
        cache.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, scale=0.25, softcap=0.0)
    cache.compress_prompt(q, k, v, None)
    with pytest.raises(KvfxCacheError, match="layer 2: the prompt was already written"):
        cache.compress_prompt(q, k, v, None)


# ---- 6. CUDA: the fused kernel in the compiled model ------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("config", [QuantizeKIVI(bits=4, group=16, residual=32),
                                    QuantizeGEAR(bits=4, group=16, residual=32, outliers=0.2)], ids=["kivi", "gear"])
def test_cuda_compiled_model_runs_the_fused_kernel_and_matches_the_reference_path(config, monkeypatch):
    spec = spec_for(config)
    ids, mask = (x.cuda() for x in left_padded_batch([40, 33], seed=1))
    calls = {"fused": 0, "reference": 0}
    fused, reference = quantization_base.quant_decode_attention, quantization_base.quant_decode_attention_reference

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(quantization_base, "quant_decode_attention", counted("fused", fused))
    monkeypatch.setattr(quantization_base, "quant_decode_attention_reference", counted("reference", reference))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = generate(compiled(spec, torch.bfloat16, "cuda"), ids, mask, 40)
    assert calls == {"fused": 40 * 2 - 2, "reference": 0}  # 2 layers x 39 decode steps
    assert not [w for w in caught if "runs the torch reference" in str(w.message)]
    monkeypatch.setattr(quantization_base, "supports", lambda *args: "forced reference path")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = generate(compiled(spec, torch.bfloat16, "cuda"), ids, mask, 40)
    assert calls["reference"] == 40 * 2 - 2
    # bf16 logits: compare while the greedy tokens agree (a near-tie may flip later), at least 8 steps
    agree = (expected.sequences == actual.sequences).all(dim=0).tolist()[ids.shape[1]:] + [False]
    steps = agree.index(False)
    assert steps >= 8, f"greedy tokens diverge after {steps} steps"
    for step in range(steps):
        torch.testing.assert_close(actual.scores[step].float(), expected.scores[step].float(), atol=3e-2, rtol=3e-2,
                                   msg=lambda m: f"step {step}: {m}")
    state = kvfx.REGISTRY.states()[-1]
    assert all(min(cache.quantized_tokens) > 0 for cache in state.layers.values())


def test_quantization_plans_are_checked_at_compile_time():
    """What the caches would refuse at the first prefill is a SpecError when the graph is compiled."""
    from kvfx.plans import check_quantization
    from kvfx.spec import SpecError

    def check(spec: dict, dims=(16, 16)):
        check_quantization(Spec.from_dict(spec).resolve(2, 2), dims)

    check({"version": 1, "default": {"quantize": {"method": "kivi", "group": 8, "residual": 16}}})  # valid
    check({"version": 1, "default": {"quantize": {"method": "kivi"}}}, None)  # head dims unknown: not checked
    mixed = {"version": 1, "default": {"quantize": {"method": "kivi", "group": 8, "residual": 16}},
             "overrides": [{"layers": "1", "heads": [1], "quantize": {"method": "none"}}]}
    with pytest.raises(SpecError, match=r"layer 1: a quantized layer takes one quantize config for all its KV heads, "
                                        r"got kivi\(.*\) on KV heads \[0\]; none on KV heads \[1\]; quantize "
                                        r"whole layers"):
        check(mixed)
    razor = {"version": 1,
             "default": {"evict": {"method": "razor", "profile": "p.json"}, "quantize": {"method": "gear"}}}
    with pytest.raises(SpecError, match=r"layer 0: razor combined with quantization \(gear\(.*\)\) is not supported"):
        check(razor)
    with pytest.raises(SpecError, match=r"group 32 must divide head_dim 16"):
        check({"version": 1, "default": {"quantize": {"method": "kivi"}}})
