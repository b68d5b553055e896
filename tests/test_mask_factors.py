"""A prompt's bool mask goes to kvfx::attention as its factors (counted), is rebuilt exactly from them, and the plain
causal mask is recognised (so prefill runs SDPA's causal kernels with no mask); masks that are not bool AND-trees,
and decode steps' mask rows, are passed as they are."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import kvfx
import kvfx.mask_factors as mask_factors
from families import left_padded_batch, tiny_model
from kvfx.backend import rewrite_graph
from kvfx.mask_factors import KINDS, MaskFactors
from kvfx.spec import Spec


def causal_factors(batch: int, length: int, pad: torch.Tensor | None = None, window: int | None = None):
    """The factors transformers' sdpa_mask builds: ones & (kv <= q) [& padding] [& (kv > q - window)]."""
    q = torch.arange(length).view(1, 1, length, 1)
    kv = torch.arange(length).view(1, 1, 1, length)
    tensors, kinds = [torch.ones((), dtype=torch.bool), kv, q], [0, KINDS.index("le")]
    if pad is not None:
        tensors.append(pad.view(batch, 1, 1, length))
        kinds.append(0)
    if window is not None:
        tensors += [kv, q - window]
        kinds.append(KINDS.index("gt"))
    return MaskFactors.parse(tensors, kinds)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), heads=st.sampled_from([1, 2]), tq=st.integers(1, 9), tk=st.integers(1, 9),
       seed=st.integers(0, 2**16), start=st.integers(0, 8), span=st.integers(1, 9))
def test_rows_and_materialize_equal_the_and_of_the_broadcast_factors(batch, heads, tq, tk, seed, start, span):
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(batch, 1, 1, tk, generator=g) > 0.3  # [B, 1, 1, Tk]
    per_head = torch.rand(1, heads, tq, 1, generator=g) > 0.2  # [1, H, Tq, 1]
    a = torch.randint(0, 6, (1, 1, tq, 1), generator=g)
    b = torch.randint(0, 6, (1, 1, 1, tk), generator=g)
    factors = MaskFactors.parse([pad, a, b, per_head, b, a], [0, KINDS.index("ge"), 0, KINDS.index("lt")])
    want = (pad & (a >= b) & per_head & (b < a)).expand(batch, heads, tq, tk)
    assert torch.equal(factors.materialize(batch, tq).expand(batch, heads, tq, tk), want)
    start = min(start, tq - 1)
    end = min(start + span, tq)
    assert torch.equal(factors.rows(start, end).expand(batch, heads, end - start, tk), want[:, :, start:end])


@pytest.mark.parametrize("chunk", [2**28, 7])  # one chunk, or chunks of a few query rows
def test_the_plain_causal_mask_is_recognised_and_nothing_else(monkeypatch, chunk):
    monkeypatch.setattr(mask_factors, "CHECK_CHUNK", chunk)
    assert causal_factors(2, 9).is_plain_causal(2, 9)
    assert causal_factors(2, 9, pad=torch.ones(2, 9, dtype=torch.bool)).is_plain_causal(2, 9)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, 0] = False  # one padding token in one row
    assert not causal_factors(2, 9, pad=pad).is_plain_causal(2, 9)
    assert not causal_factors(2, 9, window=4).is_plain_causal(2, 9)  # a sliding window masks more
    assert causal_factors(2, 9, window=9).is_plain_causal(2, 9)  # a window as long as the prompt masks nothing
    upper = MaskFactors.parse([torch.arange(9).view(1, 1, 1, 9), torch.arange(9).view(1, 1, 9, 1)],
                              [KINDS.index("ge")])  # kv >= q: the transposed mask
    assert not upper.is_plain_causal(1, 9)


def test_bad_factor_lists_are_rejected_with_the_reason():
    assert MaskFactors.parse([], []) is None
    with pytest.raises(ValueError, match="take 2 tensors, got 1"):
        MaskFactors.parse([torch.ones(1)], [KINDS.index("le")])
    with pytest.raises(ValueError, match="unknown mask factor kinds"):
        MaskFactors.parse([torch.ones(1)], [9])
    with pytest.raises(ValueError, match="no factor kinds"):
        MaskFactors.parse([torch.ones(1)], [])


def captured_graphs(model, ids, mask, new_tokens=3):
    """The FX graphs dynamo hands a backend for generate() (prefill, first decode step, dynamic decode)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=backend)
    model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return graphs


def full_masks(gm, batch: int, length: int) -> list[str]:
    """Nodes holding a whole [B, 1, T, T] bool mask."""
    found = []
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool and tuple(value.shape) == (batch, 1, length,
                                                                                                      length):
            found.append(node.name)
    return found


def test_the_prompt_graph_no_longer_builds_the_whole_mask():
    ids, mask = left_padded_batch([7, 4])
    prefill, *decode = captured_graphs(tiny_model("llama", "sdpa"), ids, mask)
    assert full_masks(prefill, 2, 7), "the test's premise: transformers builds a [B, 1, T, T] mask"
    report = rewrite_graph(prefill, Spec.coerce(None))
    assert [site.mask_factored for site in report.rewritten] == [True, True]
    assert full_masks(prefill, 2, 7) == []
    for gm in decode:  # a decode step's mask row is small: passed as it is
        report = rewrite_graph(gm, Spec.coerce(None))
        assert report.rewritten and not any(site.mask_factored for site in report.rewritten)


def test_float_masks_of_eager_attention_are_passed_as_they_are():
    ids, mask = left_padded_batch([7, 4])
    prefill, *_ = captured_graphs(tiny_model("llama", "eager"), ids, mask)
    report = rewrite_graph(prefill, Spec.coerce(None))
    assert len(report.rewritten) == 2 and not any(site.mask_factored for site in report.rewritten)


@pytest.mark.parametrize("lengths,causal", [([6, 6], True), ([6, 3], False)])
def test_generation_through_factored_masks_equals_transformers(monkeypatch, lengths, causal):
    checks = []
    check = MaskFactors.is_plain_causal
    monkeypatch.setattr(MaskFactors, "is_plain_causal", lambda self, b, t: checks.append(check(self, b, t)) or
                        checks[-1])
    eager, compiled = tiny_model("llama", "sdpa"), tiny_model("llama", "sdpa")
    torch._dynamo.reset()
    counters.clear()
    compiled.forward = torch.compile(compiled.forward, backend="kvfx", options={"compiler": "aot_eager",
                                                                                "verbose": False})
    ids, mask = left_padded_batch(lengths, seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    expected, actual = eager.generate(ids, **kwargs), compiled.generate(ids, **kwargs)
    assert counters["kvfx"]["mask_factored"] == 2
    assert checks == [causal]  # checked once for both layers of the sequence
    assert torch.equal(expected.sequences, actual.sequences)
    for e, a in zip(expected.scores, actual.scores, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)  # fp32, attention in another order: see test_families
    assert kvfx.REGISTRY.sequences_started > 0
