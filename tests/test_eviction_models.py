"""Eviction through the compiled model == transformers running the paper-faithful reference as its attention.

The reference model is the same tiny model with kvfx's ``FaithfulAttention`` installed as a transformers attention
implementation (full cache, evicted tokens masked to -inf). The kvfx model is compiled with the same spec. Greedy
tokens must be identical, per-step logits equal within 1e-4 (fp32, as in test_families) and, after generation,
every layer's kept set equal. Families whose attention does not go through transformers' attention interface
(GPT-J, Falcon, MPT) are checked at budget 100% against plain transformers, and then with a real budget for
running and keeping exactly the budget (the ALiBi and MQA arithmetic is checked at the attention level in
test_eviction_policies): a budget of 100% of the prompt evicts nothing before the first decode step has attended,
so the first two generated tokens and their logits must equal transformers'.
"""

from __future__ import annotations

import pytest
import torch

import kvfx
from families import FAMILIES, left_padded_batch, tiny_model
from kvfx.eviction.faithful import FaithfulAttention, register_faithful_attention
from kvfx.spec import Spec

POLICIES = {
    "window": {"method": "window", "sink": 2, "budget": 0.5},
    "h2o": {"method": "h2o", "budget": 0.5, "recent": 0.5},
    "keyformer": {"method": "keyformer", "budget": 0.5, "recent": 0.3, "seed": 7, "max_new_tokens": 8},
    "snapkv": {"method": "snapkv", "budget": 0.6, "window": 3, "pool": 3},
    "window_compact": {"method": "window", "sink": 2, "budget": 0.5, "positions": "compact"},
}
FAITHFUL = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "opt"]
CASES = [("llama", "sdpa", p) for p in POLICIES] + [("llama", "eager", "keyformer"), ("gemma2", "eager", "h2o"),
                                                    ("qwen3", "eager", "window_compact")]
CASES += [(f, "sdpa", list(POLICIES)[i % 4]) for i, f in enumerate(FAITHFUL) if f != "llama"]
NEW_TOKENS = 10


def kv_heads(config) -> int:
    for name in ("num_key_value_heads", "num_attention_heads", "n_head", "n_heads"):
        if getattr(config, name, None):
            return getattr(config, name)
    raise AssertionError("no head count")


def generate(model, ids, mask, new_tokens=NEW_TOKENS):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def compiled(family, implementation, spec):
    torch._dynamo.reset()
    model = tiny_model(family, implementation)
    model.forward = torch.compile(model.forward, backend="kvfx",
                                  options={"spec": spec, "compiler": "aot_eager", "verbose": False})
    return model


def assert_same(expected, actual):
    assert torch.equal(expected.sequences, actual.sequences)
    for step, (e, a) in enumerate(zip(expected.scores, actual.scores, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("family,implementation,policy", CASES)
def test_compiled_eviction_equals_faithful_transformers(family, implementation, policy):
    spec = Spec.from_dict({"version": 1, "default": {"evict": POLICIES[policy]}})
    reference = tiny_model(family, implementation)
    num_layers = reference.config.num_hidden_layers
    plan = spec.resolve(num_layers, kv_heads(reference.config))
    inv_freq = reference.model.rotary_emb.inv_freq if policy == "window_compact" else None
    layers = {i: FaithfulAttention(i, [p.evict for p in plan.layer_policies(i)], inv_freq=inv_freq)
              for i in range(num_layers)}
    reference.config._attn_implementation = register_faithful_attention(layers)
    ids, mask = left_padded_batch([12, 9], seed=1)
    with torch.no_grad():
        expected = generate(reference, ids, mask)
    assert all(layer.kept is not None for layer in layers.values()), "the reference attention was not used"

    model = compiled(family, implementation, spec)
    started = kvfx.REGISTRY.sequences_started
    with torch.no_grad():
        actual = generate(model, ids, mask)
    assert kvfx.REGISTRY.sequences_started == started + 1
    assert_same(expected, actual)
    state = kvfx.REGISTRY.states()[-1]
    assert sorted(state.layers) == list(range(num_layers))
    for index, cache in state.layers.items():
        assert cache.kept_positions() == layers[index].kept_positions(), f"layer {index}"


@pytest.mark.slow
@pytest.mark.parametrize("family,implementation", [("gptj", "eager"), ("falcon", "sdpa"), ("mpt", "eager")])
def test_families_outside_the_attention_interface(family, implementation):
    ids, mask = left_padded_batch([12, 9], seed=2)
    eager = tiny_model(family, implementation)
    with torch.no_grad():
        expected = generate(eager, ids, mask, 2)
        everything = compiled(family, implementation, {"version": 1, "default": {
            "evict": {"method": "h2o", "budget": 1.0, "recent": 0.5}}})
        assert_same(expected, generate(everything, ids, mask, 2))
        for policy in ("window", "keyformer"):
            model = compiled(family, implementation, {"version": 1, "default": {"evict": POLICIES[policy]}})
            out = generate(model, ids, mask)
            assert not any(torch.isnan(s).any() for s in out.scores)  # (min_new_tokens sets EOS to -inf)
            state = kvfx.REGISTRY.states()[-1]
            for cache in state.layers.values():
                assert cache.live.tolist() == [[6] * cache.live.shape[1], [4] * cache.live.shape[1]], policy


def test_a_token_budget_larger_than_the_prompt_fails_at_compile_time():
    model = compiled("llama", "sdpa", {"version": 1, "default": {"evict": {"method": "h2o", "budget": 64}}})
    ids, mask = left_padded_batch([12, 9], seed=1)
    with pytest.raises(Exception, match="layer 0, KV head 0: evict.budget 64 tokens is larger than the 12-token "
                                        "prompt this graph was compiled for"):
        generate(model, ids, mask, 2)


def test_compact_positions_need_rope_and_say_so_at_compile_time():
    model = compiled("gpt2", "sdpa", {"version": 1, "default": {"evict": POLICIES["window_compact"]}})
    ids, mask = left_padded_batch([12, 9], seed=1)
    with pytest.raises(Exception, match=r"evict.positions: 'compact' re-rotates kept keys, which needs full-width "
                                        r"rotate-half RoPE on the keys .*attention layers \[0, 1\] of this model"):
        generate(model, ids, mask, 2)
