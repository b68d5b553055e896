"""The rewrite happens where it must (counted), and not where it must not (left unchanged, with a warning)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import kvfx
from families import left_padded_batch, tiny_model


def compile_kvfx(fn, **options):
    torch._dynamo.reset()
    kvfx.REPORTS.clear()
    counters.clear()
    return torch.compile(fn, backend="kvfx", options={"compiler": "aot_eager", "verbose": False, **options})


def test_every_layer_is_rewritten_and_counted():
    model = tiny_model("llama", "sdpa")
    model.forward = compile_kvfx(model.forward)
    ids, mask = left_padded_batch([6, 3])
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(kvfx.REPORTS) == 3  # prefill, first decode step, dynamic decode: no per-step recompiles
    assert counters["kvfx"]["attention_rewritten"] == 3 * 2
    assert counters["kvfx"]["attention_unsupported"] == 0
    assert kvfx.REPORTS[0].summary("full.yaml") == "kvfx: 2/2 attention layers rewritten (sdpa, GQA 2:1), spec full.yaml"


def test_summary_line_is_printed(capsys):
    model = tiny_model("gpt2", "eager")
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="kvfx", options={"compiler": "eager"})
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert "kvfx: 2/2 attention layers rewritten (eager, MHA), spec evict=none quantize=none" in capsys.readouterr().err


def test_no_cache_means_no_rewrite():
    model = tiny_model("llama", "sdpa")
    forward = compile_kvfx(model.forward)
    with pytest.warns(UserWarning, match=r"kvfx: attention layer 0 \(sdpa\) left unchanged: no KV-cache update"):
        out = forward(torch.tensor([[3, 4, 5]]), use_cache=False)
    torch.testing.assert_close(out.logits, model(torch.tensor([[3, 4, 5]]), use_cache=False).logits)
    assert counters["kvfx"]["attention_rewritten"] == 0


def test_attention_weights_returned_to_the_user_prevent_the_rewrite():
    model = tiny_model("llama", "eager")
    forward = compile_kvfx(model.forward)
    ids = torch.tensor([[3, 4, 5, 6]])
    with pytest.warns(UserWarning, match="is also used outside the attention"):
        out = forward(ids, output_attentions=True)
    expected = model(ids, output_attentions=True)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.attentions[0], expected.attentions[0])
    assert counters["kvfx"]["attention_rewritten"] == 0


def test_training_dropout_prevents_the_rewrite():
    model = tiny_model("llama", "eager")
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    forward = compile_kvfx(model.forward)
    with pytest.warns(UserWarning, match="attention dropout 0.5 in training mode"):
        forward(torch.tensor([[3, 4, 5]]), use_cache=True)
    assert counters["kvfx"]["attention_rewritten"] == 0


def test_softmax_matmul_without_a_cache_is_not_rewritten():
    def not_a_cached_attention(q, k, v):
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.5, dim=-1), v)

    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    fn = compile_kvfx(not_a_cached_attention)
    with pytest.warns(UserWarning, match="no KV-cache update"):
        torch.testing.assert_close(fn(q, k, v), not_a_cached_attention(q, k, v))
    assert counters["kvfx"]["attention_rewritten"] == 0


def test_a_graph_without_attention_is_passed_through():
    fn = compile_kvfx(lambda x: torch.relu(x) * 2)
    torch.testing.assert_close(fn(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 4.0]))
    assert kvfx.REPORTS[-1].sites == []


def test_unknown_backend_option_is_rejected():
    fn = torch.compile(lambda x: x + 1, backend="kvfx", options={"specs": "full.yaml"})
    with pytest.raises(Exception, match=r"unknown backend option\(s\) \['specs'\]"):
        fn(torch.ones(2))


def test_unimplemented_method_is_rejected_at_compile_time(monkeypatch):
    """Every method of spec v1 is implemented now: the rejection of one that is valid but not implemented is tested
    by taking gear out of the implemented set."""
    import kvfx.plans

    monkeypatch.setitem(kvfx.plans.IMPLEMENTED, "quantize", {"none", "kivi"})
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + 1, backend="kvfx",
                       options={"spec": {"version": 1, "default": {"quantize": {"method": "gear"}}}})
    with pytest.raises(Exception, match=r"default.quantize.method: 'gear' is valid but not implemented yet"):
        fn(torch.ones(2))


def test_bad_compiler_option_is_rejected():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + 1, backend="kvfx", options={"compiler": "tvm"})
    with pytest.raises(Exception, match="options\\['compiler'\\] is 'tvm', not one of inductor, aot_eager, eager"):
        fn(torch.ones(2))


@pytest.mark.parametrize("options,message", [
    ({"cpp_wrapper": "yes"}, "options\\['cpp_wrapper'\\] is 'yes', not True or False"),
    ({"cpp_wrapper": True, "compiler": "eager"}, "options\\['cpp_wrapper'\\] is inductor's; the compiler is 'eager'"),
])
def test_bad_cpp_wrapper_option_is_rejected(options, message):
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + 1, backend="kvfx", options=options)
    with pytest.raises(Exception, match=message):
        fn(torch.ones(2))


@pytest.mark.slow
def test_cpp_wrapper_compiles_the_rewritten_graph_and_generates_what_aot_eager_does():
    """Inductor's C++ wrapper calls kvfx's Python custom op from compiled code, with an evicting cache (window 4 of
    a 6-token prompt): the same tokens and logits as the graph run by aot_eager (fp32, kernels in another order:
    see test_families for the tolerance)."""
    spec = {"version": 1, "default": {"evict": {"method": "window", "sink": 2, "budget": 4}}}
    plain, compiled = tiny_model("llama", "sdpa"), tiny_model("llama", "sdpa")
    ids, mask = left_padded_batch([6, 6], seed=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    plain.forward = compile_kvfx(plain.forward, spec=spec)
    expected = plain.generate(ids, **kwargs)
    compiled.forward = compile_kvfx(compiled.forward, compiler="inductor", cpp_wrapper=True, spec=spec)
    actual = compiled.generate(ids, **kwargs)
    assert counters["kvfx"]["attention_rewritten"] >= 2
    assert torch.equal(expected.sequences, actual.sequences)
    for e, a in zip(expected.scores, actual.scores, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
