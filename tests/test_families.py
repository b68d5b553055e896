"""The compiled model equals eager transformers: every family x attention implementation x batch x prompt length.

Identity spec, random tiny fp32 models: greedy tokens must be identical and per-step logits equal within 1e-4
(fp32 attention computed in a different order differs by ~1e-6 relative; logits are O(1)). Each (family,
implementation) is compiled once; hypothesis then varies the batch (left padding), the prompt lengths and the
number of new tokens across generate() calls of the same compiled model, so the test also checks that
sequences never mix and that kvfx served every call. The broad test hands the rewritten graph to aot_eager (which
also traces the ops' fake implementations); a few families go through inductor.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kvfx
from families import FAMILIES, left_padded_batch, tiny_model

IMPLEMENTATIONS = ("sdpa", "eager")
# transformers itself has no SDPA path for these families (loading raises); kvfx handles their eager attention.
NO_SDPA_IN_TRANSFORMERS = {"gptj", "mpt"}
COMBOS = [(f, i) for f in FAMILIES for i in IMPLEMENTATIONS if not (i == "sdpa" and f in NO_SDPA_IN_TRANSFORMERS)]
EXAMPLES = int(os.environ.get("KVFX_FAMILY_EXAMPLES", "2"))


def num_layers(family: str) -> int:
    config = FAMILIES[family]
    return config.get("num_hidden_layers", config.get("n_layer", config.get("n_layers")))


def generate(model, ids, mask, new_tokens):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def assert_same_generation(expected, actual):
    assert torch.equal(expected.sequences, actual.sequences)
    for step, (e, a) in enumerate(zip(expected.scores, actual.scores, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")


def kvfx_generate(model, ids, mask, new_tokens):
    """Generate through kvfx; asserts kvfx served the call and warned about nothing."""
    started = kvfx.REGISTRY.sequences_started
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(model, ids, mask, new_tokens)
    assert [str(w.message) for w in caught if str(w.message).startswith("kvfx")] == []
    assert kvfx.REGISTRY.sequences_started == started + 1, "kvfx did not serve this generate() call"
    return out


_compiled: dict = {}


def compiled_pair(family, implementation, compiler="aot_eager"):
    """(eager model, the same weights compiled with kvfx), built once per combination."""
    key = (family, implementation, compiler)
    if key not in _compiled:
        _compiled.clear()
        torch._dynamo.reset()
        kvfx.REPORTS.clear()
        eager, compiled = tiny_model(family, implementation), tiny_model(family, implementation)
        compiled.forward = torch.compile(compiled.forward, backend="kvfx",
                                         options={"compiler": compiler, "verbose": False})
        _compiled[key] = (eager, compiled)
    return _compiled[key]


@pytest.mark.parametrize("family,implementation", COMBOS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3), new_tokens=st.integers(1, 5),
       seed=st.integers(0, 2**16))
@example(lengths=[7, 3], new_tokens=4, seed=0)
def test_kvfx_identity_equals_transformers(family, implementation, lengths, new_tokens, seed):
    eager, compiled = compiled_pair(family, implementation)
    ids, mask = left_padded_batch(lengths, seed=seed)
    assert_same_generation(generate(eager, ids, mask, new_tokens), kvfx_generate(compiled, ids, mask, new_tokens))
    assert kvfx.REPORTS, "the kvfx backend compiled no graph"
    for report in kvfx.REPORTS:
        assert len(report.rewritten) == len(report.sites) == num_layers(family)


@pytest.mark.slow
@pytest.mark.parametrize("family,implementation", [("llama", "sdpa"), ("gemma2", "eager"), ("falcon", "sdpa")])
def test_kvfx_identity_through_inductor(family, implementation):
    eager, compiled = compiled_pair(family, implementation, "inductor")
    ids, mask = left_padded_batch([9, 4], seed=1)
    assert_same_generation(generate(eager, ids, mask, 6), kvfx_generate(compiled, ids, mask, 6))
