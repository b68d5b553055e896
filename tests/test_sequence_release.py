"""A finished sequence's kvfx cache is freed by reference counting alone, as soon as transformers drops its cache:
no reference cycle may hold it until Python's cyclic collector runs. (Seen on an H100: the eviction decode step's
CUDA-graph closure referred back to its cache, so the previous generate() call's 2.2 GiB cache stayed allocated
through the next prompt's peak.)

Each test compiles with a first generate() call (compilation itself leaves cycles behind), collects once, then runs a
second call with the cyclic collector off and checks that the second sequence's state and every one of its layer
caches are gone once the registry has collected the dead handle."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import kvfx
from families import tiny_model

_KIVI = {"method": "kivi", "bits": 4, "group": 8, "residual": 16}  # head_dim 16: groups of 8 channels
POLICIES = {
    "full": {},
    "window": {"evict": {"method": "window", "sink": 2, "budget": 0.25}},
    "h2o": {"evict": {"method": "h2o", "budget": 0.3, "recent": 0.5}},
    "keyformer": {"evict": {"method": "keyformer", "budget": 0.5, "recent": 0.3, "seed": 0}},
    "snapkv": {"evict": {"method": "snapkv", "budget": 16, "window": 4, "pool": 3}},
    "kivi": {"quantize": _KIVI},
    "gear": {"quantize": {**_KIVI, "method": "gear", "rank": 2, "outliers": 0.02, "prefill_rank": 4}},
    "h2o_kivi": {"evict": {"method": "h2o", "budget": 0.5, "recent": 0.5}, "quantize": _KIVI},
}
SPECS = sorted(POLICIES)


def _second_sequence_is_freed_without_the_cyclic_collector(policy: str, device: str, prompt: int, new_tokens: int,
                                                          compiler: str):
    spec = {"version": 1, "default": POLICIES[policy]} if POLICIES[policy] else {"version": 1}
    torch._dynamo.reset()
    model = tiny_model("llama", "sdpa").to(device)
    model.forward = torch.compile(model.forward, backend="kvfx",
                                  options={"spec": spec, "verbose": False, "compiler": compiler})
    ids = torch.randint(3, 90, (2, prompt), generator=torch.Generator().manual_seed(0)).to(device)

    def generate():
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    generate()  # compiles
    gc.collect()
    kvfx.REGISTRY.collect()
    assert kvfx.REGISTRY.states() == []
    gc.disable()
    try:
        generate()
        (state,) = [state for _, state in kvfx.REGISTRY._states.values()]
        refs = [weakref.ref(state)] + [weakref.ref(layer) for layer in state.layers.values()]
        assert len(refs) == 1 + 2  # the state and its two layers' caches
        del state
        kvfx.REGISTRY.collect()  # what the next sequence's begin does
        assert [ref() is None for ref in refs] == [True] * len(refs)
    finally:
        gc.enable()


@pytest.mark.parametrize("spec", SPECS)
def test_a_finished_sequence_is_freed_without_the_cyclic_collector(spec):
    # aot_eager: the cycles in question are kvfx's own objects; the GPU test runs them under inductor
    _second_sequence_is_freed_without_the_cyclic_collector(spec, "cpu", prompt=40, new_tokens=6, compiler="aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS)
def test_on_the_gpu_a_finished_sequence_is_freed_without_the_cyclic_collector(spec):
    # enough decode steps for the eviction step to be captured and replayed from a CUDA graph (step_graph.WARMUP)
    _second_sequence_is_freed_without_the_cyclic_collector(spec, "cuda", prompt=64, new_tokens=8, compiler="inductor")
