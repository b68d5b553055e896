"""Real checkpoints from the shared assets: kvfx's greedy continuation equals eager transformers on real text."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

import kvfx
from kvfx.assets import asset


def load(name, dtype=torch.float32, device="cpu"):
    path = asset(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def prompt_ids(tokenizer, text_file, tokens, offset=0):
    text = asset("text", text_file).read_text()[offset:offset + tokens * 8]
    return tokenizer(text, return_tensors="pt").input_ids[:, :tokens]


def greedy(model, ids, new_tokens, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kw)


def compile_kvfx(model, compiler):
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="kvfx", options={"compiler": compiler, "verbose": False})
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name,text,compiler", [
    ("codelm-27m", "heldout-code.txt", "inductor"),
    ("stories260K", "tinystories-excerpt.txt", "aot_eager"),
])
def test_same_greedy_continuation_as_eager_on_cpu(name, text, compiler):
    model, tokenizer = load(name)
    ids = prompt_ids(tokenizer, text, 96, offset=5000)
    expected = greedy(model, ids, 32)
    started = kvfx.REGISTRY.sequences_started
    actual = greedy(compile_kvfx(model, compiler), ids, 32)
    assert kvfx.REGISTRY.sequences_started == started + 1
    assert torch.equal(actual, expected), tokenizer.decode(actual[0, -32:]) + " != " + tokenizer.decode(expected[0, -32:])


def assert_same_or_near_tie(expected, actual, atol):
    """Greedy sequences equal, or they part only where eager's top two logits are within ``atol`` (a bf16 tie)."""
    e, a = expected.sequences, actual.sequences
    if torch.equal(e, a):
        return
    row, col = (e != a).nonzero()[0].tolist()
    step = col - (e.shape[1] - len(expected.scores))
    top2 = expected.scores[step][row].float().topk(2).values
    assert top2[0] - top2[1] <= atol, f"diverged at step {step} with eager margin {top2[0] - top2[1]:.4f}"


@pytest.mark.gpu
def test_codelm_bf16_on_gpu_matches_eager_through_triton():
    model, tokenizer = load("codelm-27m", torch.bfloat16, "cuda")
    ids = prompt_ids(tokenizer, "heldout-code.txt", 512, offset=20000).cuda()
    kw = dict(output_scores=True, return_dict_in_generate=True)
    expected = greedy(model, ids, 64, **kw)
    actual = greedy(compile_kvfx(model, "inductor"), ids, 64, **kw)
    # bf16 logits of O(10) carry ~0.06 of rounding; attention summed in another order moves them by about that.
    for e, a in zip(expected.scores[:1], actual.scores[:1]):
        torch.testing.assert_close(a.float(), e.float(), rtol=0, atol=0.25)
    assert_same_or_near_tie(expected, actual, atol=0.25)


@pytest.mark.gpu
def test_head_dim_8_falls_back_to_the_reference_with_a_warning():
    model, tokenizer = load("stories260K", torch.float32, "cuda")
    ids = prompt_ids(tokenizer, "tinystories-excerpt.txt", 64).cuda()
    expected = greedy(model, ids, 16)
    with pytest.warns(UserWarning, match="kvfx: decode attention runs the torch reference .*head_dim 8"):
        actual = greedy(compile_kvfx(model, "inductor"), ids, 16)
    assert torch.equal(actual, expected)


class _MemoryProbe(LogitsProcessor):
    """Called once per generated token: records allocated memory against kvfx's own storage at that moment."""

    def __init__(self):
        self.excess = []

    def __call__(self, input_ids, scores):
        kv = sum(state.nbytes for state in kvfx.REGISTRY.states())
        self.excess.append(torch.cuda.memory_allocated() - kv)
        return scores


@pytest.mark.gpu
def test_peak_memory_is_kvfx_storage_alone():
    """4096-token prompt + 1024 new tokens: the DynamicCache holds no copy, so memory beyond kvfx's storage stays
    at the level of one step's activations, while eager transformers' cache grows by the whole KV cache."""
    model, tokenizer = load("codelm-27m", torch.bfloat16, "cuda")
    ids = prompt_ids(tokenizer, "heldout-code.txt", 4096).cuda()
    assert ids.shape[1] == 4096
    full_kv = 8 * 2 * 2 * 64 * 2 * (4096 + 1024)  # layers x (K, V) x KV heads x head_dim x bf16 bytes x tokens

    def measure(m):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        probe = _MemoryProbe()
        greedy(m, ids, 1024, logits_processor=LogitsProcessorList([probe]))
        return base, probe, torch.cuda.max_memory_allocated() - base

    base_eager, probe_eager, peak_eager = measure(model)
    model = compile_kvfx(model, "inductor")
    greedy(model, ids[:, :64], 4)  # compile outside the measurement
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, probe, peak = measure(model)
    # Once decoding, what is allocated beyond kvfx's storage is the weights plus one step's transient tensors.
    decode_excess = max(probe.excess[1:]) - base
    eager_excess = max(probe_eager.excess[1:]) - base_eager  # eager keeps the full cache (no kvfx storage)
    assert eager_excess > full_kv, "the probe does not see eager's DynamicCache: the test could not fail"
    assert decode_excess < 0.1 * full_kv, f"{decode_excess} bytes beyond kvfx's storage while decoding"
    assert peak < peak_eager, (peak, peak_eager)
