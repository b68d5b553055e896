"""RazorAttention on a GPU: the Triton ragged decode path == the paper-faithful reference, and the kept bytes of a
real model follow the formula retrieval heads x T + others x (sink + window + 1)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kvfx
from kvfx.assets import asset
from kvfx.eviction.razor import retrieval_heads, window_size
from kvfx.spec import EvictRazor
from test_razor import run_razor_case

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("compensate", [True, False])
def test_triton_ragged_path_equals_paper_faithful_reference(mask_kind, compensate):
    """fp32: the kernel sums in another order than the float32 reference (~1e-6 relative)."""
    run_razor_case(3, 4, 2, 200, 40, 4, 16, compensate, [True, False, False, True], [0, 17, 5], mask_kind, seed=1,
                   d=64, device="cuda", tol=2e-5)


def test_triton_ragged_path_in_bf16():
    """bf16 K/V/Q: outputs within bf16 rounding of the float32 reference on the same (rounded) inputs."""
    run_razor_case(2, 8, 4, 600, 20, 4, 64, True, [True] + [False] * 7, [0, 9], "bool", seed=2, d=128,
                   device="cuda", dtype=torch.bfloat16, tol=2e-2)


def test_kept_bytes_follow_the_formula_on_codelm():
    model = AutoModelForCausalLM.from_pretrained(asset("codelm-27m"), dtype=torch.bfloat16).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(asset("codelm-27m"))
    ids = tokenizer(asset("text", "heldout-code.txt").read_text()[:20000], return_tensors="pt").input_ids
    ids = ids[:, :1024].repeat(2, 1).cuda()
    evict = {"method": "razor", "profile": "examples/profiles/codelm-27m.json"}
    model.forward = torch.compile(model.forward, backend="kvfx",
                                  options={"spec": {"version": 1, "default": {"evict": evict}}, "verbose": False})
    new_tokens = 8
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=1, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 1024 + new_tokens  # (the cache state lives as long as its past_key_values)
    config = EvictRazor(**evict)
    chosen = retrieval_heads(config)
    window = window_size(config, 1024)
    tokens = 1024 + new_tokens - 1  # the last generated token is never fed back
    state = kvfx.REGISTRY.states()[-1]
    total = 0
    for layer, cache in state.layers.items():
        kept = sum((layer, head) in chosen for head in range(2))
        formula = 2 * (kept * tokens + (2 - kept) * (config.sink + window + 1)) * 2 * 64 * 2  # rows, K+V, d, bf16
        assert cache.k.is_cuda and cache.kept_bytes == formula, f"layer {layer}"
        slots = sum(int(n) for n in cache.lengths[0].tolist())  # every head's slots in use, row 0
        assert slots == kept * tokens + (2 - kept) * (config.sink + window)
        total += formula
    full = 8 * 2 * 2 * tokens * 2 * 64 * 2
    assert total < 0.4 * full  # 2 of 16 KV heads keep everything: about 30% of the full cache's bytes
