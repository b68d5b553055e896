"""kvfx::chunked_mlp and the pass that inserts it (kvfx.passes.chunk_mlp).

- The op equals the unchunked MLP for every activation, gated or plain, with and without biases, at any chunk size.
  float32 on CPU: a row's output is the same sum of the same products, but the matmul library may block a slice of
  rows differently from the whole (one row: a matrix-vector product), so equal within 1e-5 on O(1) values (a few
  float32 roundings of sums of 12-40 terms), not bitwise.
- The pass rewrites the MLPs of real prompt graphs (counted) and leaves alone: decode graphs, MLPs below the size
  threshold, MLPs whose intermediate is read elsewhere, shapes it does not know (a fused gate_up projection).
- generate() with chunking forced equals eager transformers.
- On the GPU: the op's peak memory is one chunk's intermediates, not the whole MLP's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import kvfx
from families import tiny_model
from kvfx.chunked_mlp import ACTIVATIONS, chunked_mlp, chunked_mlp_reference
from kvfx.passes.chunk_mlp import chunk_mlps, find_mlps


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 70), chunk=st.integers(1, 80), gated=st.booleans(), bias=st.booleans(),
       activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_the_op_equals_the_whole_mlp(rows, chunk, gated, bias, activation, seed):
    gen = torch.Generator().manual_seed(seed)
    C, I, C_out = 12, 40, 10

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = randn(2, rows, C)  # leading dims [2, rows] flatten to 2 * rows rows
    # weights scaled by 1/sqrt(fan-in), as trained layers are: every value O(1), so 1e-5 is a few float32 roundings
    # of a sum of C or I terms taken in another order (chunk = 1 runs matrix-vector products)
    w_gate, b_gate = (randn(I, C) / C**0.5, randn(I) if bias else None) if gated else (None, None)
    w_up, b_up, w_down = randn(I, C) / C**0.5, randn(I) if bias else None, randn(C_out, I) / I**0.5
    b_down = randn(C_out) if bias else None
    args = (x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation)
    expected = chunked_mlp_reference(*args)
    actual = chunked_mlp(*args, chunk)
    assert actual.shape == (2, rows, C_out)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_the_op_rejects_bad_arguments():
    x, w = torch.randn(3, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="activation 'swish' is not one of"):
        chunked_mlp(x, None, None, w, None, w, None, "swish", 2)
    with pytest.raises(ValueError, match="chunk_rows is 0, not >= 1"):
        chunked_mlp(x, None, None, w, None, w, None, "relu", 0)


def _graphs(model, ids, new_tokens=2, **options):
    """Every graph the kvfx backend compiles for a generate() call, after kvfx's passes (aot_eager)."""
    import kvfx.backend as backend

    seen = []
    original = backend._compile

    def record(gm, example_inputs, compiler, cpp_wrapper=False, long_prompt=False):
        seen.append(gm)
        gm.meta["kvfx_long_prompt"] = long_prompt
        return original(gm, example_inputs, compiler, cpp_wrapper, long_prompt)

    backend._compile = record
    try:
        model.forward = torch.compile(model.forward, backend="kvfx",
                                      options={"compiler": "aot_eager", "verbose": False, **options})
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        backend._compile = original
    return seen, out


def _chunked_calls(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.kvfx.chunked_mlp.default]


# family -> the activation kvfx should find in its MLPs
FAMILY_MLPS = {"llama": "silu", "gemma2": "gelu_tanh", "mpt": "gelu", "opt": "relu", "gpt_neox": "gelu"}


@pytest.mark.parametrize("family", sorted(FAMILY_MLPS))
def test_prompt_mlps_are_chunked_and_generation_equals_transformers(family):
    torch._dynamo.reset()
    model = tiny_model(family, "eager")
    ids = torch.randint(3, 90, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                  do_sample=False, pad_token_id=0)
    before = counters["kvfx"]["mlp_chunked"]
    # 80 rows x I >= 64 columns x 4 bytes >= 20 KiB: a threshold of 4 KiB chunks the prompt, not a 2-row step
    graphs, actual = _graphs(model, ids, new_tokens=4, mlp_chunk_mib=4 / 1024)
    prompt, *steps = graphs
    calls = _chunked_calls(prompt)
    assert len(calls) == 2  # one per layer
    assert {c.args[7] for c in calls} == {FAMILY_MLPS[family]}
    assert all(1 <= c.args[8] < 80 for c in calls)  # really split into several blocks
    assert all(_chunked_calls(g) == [] for g in steps)  # decode graphs: 2 rows, under the threshold
    # the prompt's graph gets inductor's long-prompt settings, decode graphs do not
    assert prompt.meta["kvfx_long_prompt"] and not any(g.meta["kvfx_long_prompt"] for g in steps)
    assert counters["kvfx"]["mlp_chunked"] == before + 2
    assert torch.equal(actual, expected)


def test_a_fused_gate_up_projection_is_not_matched():
    torch._dynamo.reset()
    model = tiny_model("phi3", "eager")  # gate_up_proj, then chunk: not a pattern kvfx knows
    graphs, _ = _graphs(model, torch.randint(3, 90, (2, 40)), mlp_chunk_mib=4 / 1024)
    assert all(_chunked_calls(g) == [] for g in graphs)


def test_nothing_is_chunked_below_the_threshold_or_when_turned_off():
    for options in ({}, {"mlp_chunk_mib": 0}):
        torch._dynamo.reset()
        graphs, _ = _graphs(tiny_model("llama", "sdpa"), torch.randint(3, 90, (2, 40)), **options)
        assert graphs and all(_chunked_calls(g) == [] for g in graphs)


class _LeakyMlp(torch.nn.Module):
    """A gated MLP whose gate activation is also returned: chunking it would lose that tensor."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        gate = F.silu(self.gate(x))
        return self.down(gate * self.up(x)), gate


def _dynamo_graph(module, *inputs):
    """The graph dynamo hands a backend for ``module(*inputs)``, and its inputs (the parameters among them)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend)(*inputs)
    return graphs[0]


def test_an_mlp_whose_intermediate_is_read_elsewhere_is_left_alone():
    gm, _ = _dynamo_graph(_LeakyMlp(), torch.randn(64, 8))
    assert find_mlps(gm.graph) == []
    assert chunk_mlps(gm, 16) == 0


def test_a_standalone_mlp_graph_is_rewritten_and_still_computes_the_same():
    module = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(32, 8))
    x = torch.randn(64, 8)
    gm, inputs = _dynamo_graph(module, x)
    assert [m.activation for m in find_mlps(gm.graph)] == ["gelu_tanh"]
    assert chunk_mlps(gm, 64 * 32 * 4) == 0  # exactly the threshold: fits
    assert chunk_mlps(gm, 10 * 32 * 4) == 1  # 10 rows per block
    (call,) = _chunked_calls(gm)
    assert call.args[8] == 10
    out = gm(*inputs)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, module(x), rtol=1e-5, atol=1e-5)


def test_overlapping_mlps_are_rewritten_once():
    """linear -> relu -> linear -> relu -> linear holds two plain MLPs sharing the middle linear: the first is
    rewritten, the second left as it is, and the graph still computes the same."""
    module = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                 torch.nn.Linear(32, 8))
    x = torch.randn(64, 8)
    gm, inputs = _dynamo_graph(module, x)
    assert len(find_mlps(gm.graph)) == 1
    assert chunk_mlps(gm, 10 * 32 * 4) == 1
    out = gm(*inputs)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [-1, True, "256", float("inf")])
def test_the_option_is_validated(value):
    """Negative, boolean, textual or infinite sizes are refused with the option's name."""
    with pytest.raises(ValueError, match="mlp_chunk_mib"):
        kvfx.backend.BackendOptions.parse({"mlp_chunk_mib": value})


def test_a_long_prompt_graph_compiles_under_inductor_with_its_settings(monkeypatch):
    """The inductor patch of a long prompt's graph is one inductor accepts, and the result still equals
    transformers."""
    from torch._inductor import compile_fx as inductor

    patches = []
    original = inductor.compile_fx

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        patches.append(config_patches)
        return original(gm, example_inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", spy)
    torch._dynamo.reset()
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(3, 90, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                                  do_sample=False, pad_token_id=0)
        model.forward = torch.compile(model.forward, backend="kvfx", options={"verbose": False,
                                                                               "mlp_chunk_mib": 4 / 1024})
        actual = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                                do_sample=False, pad_token_id=0)
    assert patches[0] == kvfx.backend.LONG_PROMPT_INDUCTOR  # the prompt
    assert all(p is None for p in patches[1:]) and len(patches) >= 2  # the decode steps
    assert torch.equal(actual, expected)


@pytest.mark.gpu
def test_on_the_gpu_the_peak_is_one_chunk_and_the_output_equals_the_whole_mlp():
    torch.manual_seed(0)
    rows, C, I = 16384, 512, 2048
    x = torch.randn(rows, C, device="cuda", dtype=torch.bfloat16)
    w_gate, w_up = (torch.randn(I, C, device="cuda", dtype=torch.bfloat16) / C**0.5 for _ in range(2))
    w_down = torch.randn(C, I, device="cuda", dtype=torch.bfloat16) / I**0.5
    args = (x, w_gate, None, w_up, None, w_down, None, "silu")

    def peak_over_inputs(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    expected, whole = peak_over_inputs(lambda: chunked_mlp_reference(*args))
    actual, chunked = peak_over_inputs(lambda: chunked_mlp(*args, 1024))
    # bf16 outputs of the same per-row sums: at most a rounding or two of bf16 (2**-8 relative) apart
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)
    out_bytes = rows * C * 2
    assert whole >= out_bytes + 2 * rows * I * 2  # gate and up alive together, at least
    assert chunked <= out_bytes + 4 * 1024 * I * 2 + out_bytes // 8  # the output, one block's intermediates
