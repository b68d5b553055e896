"""Eviction on a GPU: the Triton path (scored decode, prompt column scores) == the paper-faithful reference, memory
stays flat however long generation runs, and nothing recompiles per step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

import kvfx
from eviction_cases import run_side_by_side
from kvfx.assets import asset
from kvfx.spec import EvictH2O, EvictKeyformer, EvictSnapKV, EvictWindow

pytestmark = pytest.mark.gpu

CONFIGS = [EvictWindow(sink=4, budget=0.3), EvictH2O(budget=0.3, recent=0.5), EvictKeyformer(budget=0.3, seed=3),
           EvictSnapKV(budget=0.4, window=8, pool=7)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_triton_fast_path_equals_paper_faithful_reference(config, heads):
    """fp32 on the GPU: the kernels sum in another order than the fp32 CPU reference (~1e-6 relative); kept sets
    must still be identical at every step."""
    q_heads, kv_heads = heads
    run_side_by_side([config] * kv_heads, batch=3, q_heads=q_heads, kv_heads=kv_heads, head_dim=64, prompt=200,
                     steps=40, pads=(0, 17, 5), device="cuda", atol=2e-5, rtol=2e-5)


def test_compact_positions_on_the_gpu():
    """positions: compact with the Triton kernels: re-rotated keys and query, fp32, against the faithful reference."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    run_side_by_side([EvictWindow(sink=4, budget=40, positions="compact"), EvictWindow(sink=4, budget=40)],
                     batch=3, q_heads=8, kv_heads=2, head_dim=64, prompt=120, steps=30, pads=(0, 17, 5),
                     device="cuda", inv_freq=inv_freq, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("config", CONFIGS[1:3], ids=lambda c: c.method)
def test_triton_fast_path_in_bf16_runs_the_same_policy(config):
    """bf16 K/V: outputs within bf16 rounding (8e-3 relative, the decode kernel's tolerance) of the reference run on
    the same bf16-rounded inputs. Scores are fp32 sums of probabilities computed from the same bf16 inputs, so the
    kept sets can only differ on near-ties: run a window-free case where the kept set is checked too."""
    run_side_by_side([config] * 2, batch=2, q_heads=8, kv_heads=2, head_dim=128, prompt=128, steps=24,
                     device="cuda", dtype=torch.bfloat16, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_decode_steps_replayed_from_a_cuda_graph_equal_eager_ones(config, monkeypatch):
    """After a few eager steps a layer's decode step is replayed from a CUDA graph (the new token's position, the
    length and Keyformer's temperature live on the device): step after step, outputs and kept sets are exactly those
    of the eager kernel path, with padding in the mask, and after the mask row outgrows the graph's static copy
    (captured again)."""
    from kvfx.eviction import make_policy
    from kvfx.eviction.slot_cache import EvictingLayerCache

    torch.manual_seed(0)
    B, Hq, Hkv, D, T, steps = 2, 8, 2, 64, 40, 60
    q, k, v = (torch.randn(B, h, T + steps, D, device="cuda") for h in (Hq, Hkv, Hkv))
    valid = torch.ones(B, T + steps, dtype=torch.bool, device="cuda")
    valid[1, :5] = False  # left padding in row 1
    causal = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
    prompt_mask = (causal[None] & valid[:, None, :T])[:, None]  # [B, 1, T, T]
    caches = [EvictingLayerCache(0, [make_policy(config)] * Hkv) for _ in range(2)]
    for cache in caches:
        cache.compress_prompt(q[:, :, :T], k[:, :, :T], v[:, :, :T], prompt_mask, scale=D**-0.5, softcap=0.0,
                              is_causal=False)
    for t in range(T, T + steps):
        mask = valid[:, None, None, : t + 1]
        outs = []
        for cache, graphs in zip(caches, ("1", "0")):
            monkeypatch.setenv("KVFX_STEP_GRAPHS", graphs)
            outs.append(cache.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], mask, scale=D**-0.5,
                                     softcap=0.0))
        assert torch.equal(outs[0], outs[1]), f"step {t - T}"
        assert caches[0].kept_positions() == caches[1].kept_positions(), f"step {t - T}"
    assert caches[0].captured.replays == steps - 2  # all but the warm-up steps, the step that outgrew the row too
    assert caches[1].captured.replays == 0


class _Probe(LogitsProcessor):
    """Records, at every generation step, kvfx's KV bytes and the CUDA memory allocated."""

    def __init__(self):
        self.kv_bytes, self.allocated = [], []

    def __call__(self, input_ids, scores):
        state = kvfx.REGISTRY.states()[-1]
        self.kv_bytes.append(state.nbytes)
        self.allocated.append(torch.cuda.memory_allocated())
        return scores


@pytest.mark.slow
@pytest.mark.parametrize("evict", [{"method": "h2o", "budget": 0.25},
                                   {"method": "window", "sink": 4, "budget": 0.25}], ids=lambda e: e["method"])
def test_memory_is_flat_and_nothing_recompiles(evict):
    """codelm-27m, a 512-token prompt and 4x its 128-token budget in new tokens: KV bytes and CUDA memory after
    the prompt do not grow, and a second, longer generation compiles no new graph."""
    model = AutoModelForCausalLM.from_pretrained(asset("codelm-27m"), dtype=torch.bfloat16).cuda().eval()
    torch._dynamo.reset()
    kvfx.REPORTS.clear()
    model.forward = torch.compile(model.forward, backend="kvfx",
                                  options={"spec": {"version": 1, "default": {"evict": evict}}, "verbose": False})
    ids = torch.randint(10, 8000, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run(new_tokens):
        probe = _Probe()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=1,
                       logits_processor=LogitsProcessorList([probe]))
        return probe

    run(8)  # compiles the prompt and decode graphs
    graphs = len(kvfx.REPORTS)
    probe = run(4 * 128)
    assert len(kvfx.REPORTS) == graphs, "a graph was compiled during a longer generation"
    assert len(set(probe.kv_bytes)) == 1, f"kvfx's KV bytes changed during decoding: {sorted(set(probe.kv_bytes))}"
    # Everything else transformers holds grows by a few bytes a step (token ids, the 2-D attention mask).
    growth = probe.allocated[-1] - probe.allocated[1]
    assert growth < 64 * 1024, f"CUDA memory grew by {growth} bytes over {4 * 128} decode steps"
