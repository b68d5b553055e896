"""RazorAttention's head-wise cache (kvfx.eviction.ragged_cache) against a paper-faithful reference: the full cache,
non-retrieval heads masked to their sinks and window, and an explicit compensation token (the mean key and value of
every dropped token, its logit + log N_d), recomputed from scratch at every step.

Tolerances: float32 inputs and arithmetic on both sides; the cache keeps running means (one float32 update per
folded token) where the reference averages from scratch, so outputs agree to 1e-5 relative."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvfx.eviction.ragged_cache import RaggedLayerCache
from kvfx.eviction.razor import window_size
from kvfx.spec import EvictRazor


def faithful_razor_attention(q, keys, values, real, keep_all, *, sink, window, compensate, scale):
    """q [B, Hq, D]; keys/values [B, Hkv, T, D] all tokens so far; real [B, T] bool (not padding)."""
    b, hq, _ = q.shape
    hkv, t = keys.shape[1], keys.shape[2]
    group = hq // hkv
    out = torch.empty(b, hq, values.shape[-1])
    for row in range(b):
        rank = real[row].long().cumsum(0) - 1
        is_sink = real[row] & (rank < sink)
        recent = real[row] & ~is_sink & (torch.arange(t) >= t - window)
        for j in range(hkv):
            kept = real[row] if keep_all[j] else is_sink | recent
            dropped = real[row] & ~kept
            k, v = keys[row, j][kept], values[row, j][kept]
            bias = torch.zeros(k.shape[0])
            if compensate and not keep_all[j] and dropped.any():
                k = torch.cat([k, keys[row, j][dropped].mean(0, keepdim=True)])
                v = torch.cat([v, values[row, j][dropped].mean(0, keepdim=True)])
                bias = torch.cat([bias, torch.tensor([math.log(int(dropped.sum()))])])
            for h in range(j * group, (j + 1) * group):
                probs = torch.softmax(k @ q[row, h] * scale + bias, dim=0)
                out[row, h] = probs @ v
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), hkv=st.integers(1, 3), group=st.sampled_from([1, 2]), prompt=st.integers(4, 24),
       steps=st.integers(0, 12), sink=st.integers(0, 3), min_window=st.integers(1, 6), compensate=st.booleans(),
       retrieval=st.lists(st.booleans(), min_size=3, max_size=3), pads=st.lists(st.integers(0, 3), min_size=3,
                                                                                 max_size=3),
       mask_kind=st.sampled_from(["none", "bool", "float"]), seed=st.integers(0, 1000))
def test_cache_equals_paper_faithful_reference(batch, hkv, group, prompt, steps, sink, min_window, compensate,
                                               retrieval, pads, mask_kind, seed):
    run_razor_case(batch, hkv, group, prompt, steps, sink, min_window, compensate, retrieval[:hkv], pads, mask_kind,
                   seed)


def run_razor_case(batch, hkv, group, prompt, steps, sink, min_window, compensate, keep_all, pads, mask_kind, seed,
                   *, d=8, device="cpu", dtype=torch.float32, tol=1e-5, compress_ratio=5.0):
    """Prefill, then ``steps`` decode steps through RaggedLayerCache and the faithful reference (float32 on the
    CPU), comparing every step's output."""
    gen = torch.Generator().manual_seed(seed)
    config = EvictRazor(profile="unused.json", sink=sink, min_window=min_window, compress_ratio=compress_ratio,
                        compensate=compensate)
    pads = [min(p, prompt - 1) for p in pads[:batch]] if mask_kind != "none" else [0] * batch
    total = prompt + steps
    keys = torch.randn(batch, hkv, total, d, generator=gen).to(dtype)
    values = torch.randn(batch, hkv, total, d, generator=gen).to(dtype)
    queries = torch.randn(batch, hkv * group, total, d, generator=gen).to(dtype)
    real = torch.ones(batch, total, dtype=torch.bool)
    for row, pad in enumerate(pads):
        real[row, :pad] = False

    def mask_for(length, rows):  # the last `rows` queries of a `length`-token cache, transformers' layout
        if mask_kind == "none":
            return None
        causal = torch.ones(length, length, dtype=torch.bool).tril()[length - rows:]
        allowed = causal[None, None] & real[:, None, None, :length]
        if mask_kind == "bool":
            return allowed.to(device)
        return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype).to(device)

    on = dict(device=device)
    cache = RaggedLayerCache(0, keep_all, config)
    cache.compress_prompt(queries[:, :, :prompt].to(**on), keys[:, :, :prompt].to(**on),
                          values[:, :, :prompt].to(**on), mask_for(prompt, prompt))
    window = window_size(config, prompt)
    assert cache.window == window
    scale = d**-0.5
    for step in range(steps):
        t = prompt + step
        out = cache.decode(queries[:, :, t:t + 1].to(**on), keys[:, :, t:t + 1].to(**on),
                           values[:, :, t:t + 1].to(**on), mask_for(t + 1, 1), scale=scale, softcap=0.0)[:, :, 0]
        ref = faithful_razor_attention(queries[:, :, t].float(), keys[:, :, :t + 1].float(),
                                       values[:, :, :t + 1].float(), real[:, :t + 1], keep_all, sink=sink,
                                       window=window, compensate=compensate, scale=scale)
        torch.testing.assert_close(out.float().cpu(), ref, rtol=tol, atol=tol, msg=lambda m: f"step {step}: {m}")
    assert cache.seen == total
    return cache


def test_kept_bytes_follow_the_formula():
    b, hkv, t, d = 2, 4, 40, 16
    config = EvictRazor(profile="unused.json", sink=4, min_window=8, compress_ratio=5.0)
    keep_all = [True, False, False, True]
    cache = RaggedLayerCache(0, keep_all, config)
    k, v = torch.randn(b, hkv, t, d, dtype=torch.bfloat16), torch.randn(b, hkv, t, d, dtype=torch.bfloat16)
    cache.compress_prompt(torch.randn(b, 8, t, d), k, v, None)
    window = max(min(8, t), t // 5)
    formula = b * (2 * t + 2 * (4 + window + 1)) * 2 * d * 2  # rows x tokens x (K + V) x d x bf16 bytes
    assert cache.window == window and cache.kept_bytes == formula
    assert cache.k.numel() * 2 + cache.v.numel() * 2 == formula - b * 2 * 2 * d * 2  # slots: all but the two comps
    for step in range(70):  # past the retrieval regions' first growth
        new = torch.randn(b, hkv, 1, d, dtype=torch.bfloat16)
        cache.decode(torch.randn(b, 8, 1, d, dtype=torch.bfloat16), new, new, None, scale=0.25, softcap=0.0)
    assert cache.kept_bytes == b * (2 * (t + 70) + 2 * (4 + window + 1)) * 2 * d * 2


def test_compensation_token_counts_the_dropped_tokens():
    config = EvictRazor(profile="unused.json", sink=2, min_window=3, compress_ratio=100.0)
    cache = RaggedLayerCache(0, [False], config)
    k = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1).expand(1, 1, 10, 2).contiguous()
    cache.compress_prompt(torch.zeros(1, 1, 10, 2), k, k.clone(), None)
    assert cache.comp_n.tolist() == [[5.0]]  # 10 tokens - 2 sinks - 3 in the window
    assert cache.comp_k[0, 0].tolist() == [4.0, 4.0]  # the mean of positions 2..6
    new = torch.full((1, 1, 1, 2), 10.0)
    cache.decode(torch.zeros(1, 1, 1, 2), new, new, None, scale=1.0, softcap=0.0)
    assert cache.comp_n.tolist() == [[6.0]]  # position 7 left the window
    assert cache.comp_k[0, 0].tolist() == pytest.approx([4.5, 4.5])
    assert sorted(p for p in cache.pos[0].tolist() if p >= 0) == [0, 1, 8, 9, 10]


# ----------------------------------------------------------------------------- whole models

def _razor_reference_attention(keep_all_by_layer, config, windows):
    """A transformers attention implementation: eager attention over the prompt, then at every decode step the
    paper-faithful razor attention over transformers' own full cache."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        group = query.shape[1] // key.shape[1]
        real = attention_mask[:, 0, -1, :] > torch.finfo(attention_mask.dtype).min / 2  # [B, T]
        if query.shape[2] > 1:
            windows[module.layer_idx] = window_size(config, key.shape[2])
            logits = query @ key.repeat_interleave(group, 1).transpose(-1, -2) * scale + attention_mask
            out = torch.softmax(logits, dim=-1) @ value.repeat_interleave(group, 1)
        else:
            out = faithful_razor_attention(query[:, :, 0], key, value, real, keep_all_by_layer[module.layer_idx],
                                           sink=config.sink, window=windows[module.layer_idx],
                                           compensate=config.compensate, scale=scale)[:, :, None]
        return out.transpose(1, 2).contiguous(), None

    return attention


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    from families import tiny_model

    from kvfx.head_profile import profile_heads

    path = tmp_path_factory.mktemp("profiles") / "tiny-llama.json"
    return profile_heads(tiny_model("llama", "sdpa"), model_name="tiny-llama", length=8, progress=False).save(path)


@pytest.mark.parametrize("compensate", [True, False])
def test_compiled_razor_equals_faithful_transformers(tiny_profile, compensate):
    from families import left_padded_batch, tiny_model
    from test_eviction_models import assert_same, compiled, generate
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    import kvfx
    from kvfx.eviction.razor import retrieval_heads

    evict = {"method": "razor", "profile": str(tiny_profile), "sink": 1, "min_window": 3, "compress_ratio": 4.0,
             "compensate": compensate, "echo_ratio": 0.2, "induction_ratio": 0.2}
    config = EvictRazor(**evict)
    chosen = retrieval_heads(config)
    keep_all = {layer: [(layer, head) in chosen for head in range(2)] for layer in range(2)}
    assert 1 <= len(chosen) < 4  # some heads keep everything, some are compressed

    reference = tiny_model("llama", "sdpa")
    AttentionInterface.register("kvfx_razor_faithful", _razor_reference_attention(keep_all, config, {}))
    ALL_MASK_ATTENTION_FUNCTIONS.register("kvfx_razor_faithful", eager_mask)
    reference.config._attn_implementation = "kvfx_razor_faithful"
    ids, mask = left_padded_batch([14, 9], seed=3)
    with torch.no_grad():
        expected = generate(reference, ids, mask)
        actual = generate(compiled("llama", "sdpa", {"version": 1, "default": {"evict": evict}}), ids, mask)
    assert_same(expected, actual)
    state = kvfx.REGISTRY.states()[-1]
    for layer, cache in state.layers.items():
        assert cache.keep_all.tolist() == keep_all[layer]
        assert cache.window == window_size(config, 14)


def test_razor_profile_problems_fail_at_compile_time(tiny_profile, tmp_path):
    from families import left_padded_batch
    from test_eviction_models import compiled, generate

    ids, mask = left_padded_batch([10], seed=4)
    for profile, message in ((tmp_path / "none.json", "evict.profile: no retrieval-head profile at .*none.json; make "
                                                      "one with: kvfx profile-heads MODEL"),
                             ("examples/profiles/codelm-27m.json", "profiles 8 layers x 2 KV heads .*codelm-27m.*"
                                                                   "this model has 2 x 2")):
        spec = {"version": 1, "default": {"evict": {"method": "razor", "profile": str(profile)}}}
        with pytest.raises(Exception, match=message), torch.no_grad():
            generate(compiled("llama", "sdpa", spec), ids, mask, 1)


def test_a_profile_of_another_model_of_the_same_shape_fails_at_compile_time(tiny_profile, tmp_path):
    """Same layers and KV heads, another model (its config hash): the compile step reads the compiled model's
    config through dynamo and refuses the profile; the model's own profile compiles (the test above)."""
    import json

    from families import left_padded_batch
    from test_eviction_models import compiled, generate

    other = json.loads(tiny_profile.read_text())
    other.update(model="tiny-llama-finetune", config_hash="0" * 64)
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    ids, mask = left_padded_batch([10], seed=4)
    spec = {"version": 1, "default": {"evict": {"method": "razor", "profile": str(path)}}}
    message = (r"evict.profile: .*other.json was made for another model \(tiny-llama-finetune, config hash "
               r"000000000000, this model's is [0-9a-f]{12}\); profile this model with: kvfx profile-heads MODEL")
    with pytest.raises(Exception, match=message), torch.no_grad():
        generate(compiled("llama", "sdpa", spec), ids, mask, 1)

