"""kvfx owns the KV storage: one state per sequence batch, nothing mixed, nothing copied, nothing kept."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import DynamicCache

import kvfx
from families import left_padded_batch, tiny_model


@pytest.fixture()
def pair():
    """(eager model, kvfx-compiled model with the same weights), compiled through module.compile()."""
    torch._dynamo.reset()
    eager, compiled = tiny_model("llama", "sdpa", seed=3), tiny_model("llama", "sdpa", seed=3)
    compiled.compile(backend="kvfx", options={"compiler": "aot_eager", "verbose": False})
    return eager, compiled


def greedy_steps(model, ids, steps, cache=None):
    """Manual greedy decoding through forward(past_key_values=...); returns (tokens, cache)."""
    cache = cache if cache is not None else DynamicCache()
    out = model(ids, past_key_values=cache, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(steps - 1):
        out = model(tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1), out.past_key_values


def test_forward_with_past_key_values_matches_eager(pair):
    eager, compiled = pair
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    expected, _ = greedy_steps(eager, ids, 6)
    actual, _ = greedy_steps(compiled, ids, 6)
    assert torch.equal(actual, expected)


def test_interleaved_sequences_never_mix(pair):
    eager, compiled = pair
    a, b = torch.tensor([[5, 9, 2, 7, 11]]), torch.tensor([[40, 41, 3]])
    expected_a, _ = greedy_steps(eager, a, 5)
    expected_b, _ = greedy_steps(eager, b, 5)
    out_a = compiled(a, past_key_values=DynamicCache(), use_cache=True)
    out_b = compiled(b, past_key_values=DynamicCache(), use_cache=True)
    tokens_a, tokens_b = [out_a.logits[:, -1].argmax(-1)], [out_b.logits[:, -1].argmax(-1)]
    for _ in range(4):  # alternate one step of each
        out_a = compiled(tokens_a[-1][:, None], past_key_values=out_a.past_key_values, use_cache=True)
        out_b = compiled(tokens_b[-1][:, None], past_key_values=out_b.past_key_values, use_cache=True)
        tokens_a.append(out_a.logits[:, -1].argmax(-1))
        tokens_b.append(out_b.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens_a, 1), expected_a)
    assert torch.equal(torch.stack(tokens_b, 1), expected_b)


def test_dynamic_cache_holds_no_copy(pair):
    _, compiled = pair
    _, cache = greedy_steps(compiled, torch.tensor([[5, 9, 2, 7, 11, 3, 8]]), 4)
    assert cache.get_seq_length() == 10  # transformers still sees the right length
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            assert tensor.shape[-2] == 10
            assert tensor.untyped_storage().nbytes() <= 8, "the DynamicCache holds real KV storage"
    state = kvfx.REGISTRY.lookup(cache.layers[0].keys)
    assert state.nbytes >= 2 * 2 * (1 * 2 * 10 * 16 * 4)  # 2 layers x (K + V) x [B, Hkv, T, D] fp32


def test_states_are_freed_when_the_cache_dies(pair):
    _, compiled = pair
    gc.collect()
    before = len(kvfx.REGISTRY.states())
    out = compiled.generate(torch.tensor([[5, 9, 2]]), max_new_tokens=3, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True)
    assert len(kvfx.REGISTRY.states()) == before + 1  # alive while the returned cache is
    del out
    gc.collect()
    assert len(kvfx.REGISTRY.states()) == before


def test_beam_search_raises_a_clear_error(pair):
    _, compiled = pair
    with pytest.raises(kvfx.KvfxCacheError, match="reordered \\(beam search\\)"):
        compiled.generate(torch.tensor([[5, 9, 2]]), max_new_tokens=3, num_beams=2, do_sample=False,
                          pad_token_id=0)


def test_cropping_raises_a_clear_error(pair):
    _, compiled = pair
    out = compiled(torch.tensor([[5, 9, 2, 7]]), past_key_values=DynamicCache(), use_cache=True)
    cache = out.past_key_values
    cache.crop(2)
    with pytest.raises(kvfx.KvfxCacheError, match="holds 2 tokens but kvfx holds 4: the cache was cropped"):
        compiled(torch.tensor([[3]]), past_key_values=cache, use_cache=True)


def test_a_cache_kvfx_did_not_make_is_rejected(pair):
    eager, compiled = pair
    cache = eager(torch.tensor([[5, 9, 2]]), use_cache=True).past_key_values  # real tensors from eager
    with pytest.raises(kvfx.KvfxCacheError, match="were not produced by kvfx"):
        compiled(torch.tensor([[3]]), past_key_values=cache, use_cache=True)


def test_left_padded_rows_equal_running_alone(pair):
    _, compiled = pair
    ids, mask = left_padded_batch([8, 3, 5], seed=4)
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)  # no early EOS
    batch = compiled.generate(ids, attention_mask=mask, **options)
    for row, n in enumerate([8, 3, 5]):
        alone = compiled.generate(ids[row:row + 1, -n:], **options)
        assert torch.equal(batch[row, -5:], alone[0, -5:]), f"row {row}"


def test_storage_grows_in_chunks_and_keeps_contents():
    from kvfx.state import GROWTH_CHUNK, LayerCache

    cache = LayerCache()
    chunks = [torch.randn(2, 3, n, 4) for n in (GROWTH_CHUNK - 1, 2, GROWTH_CHUNK + 5)]
    for chunk in chunks:
        cache.append(chunk, -chunk)
    expected = torch.cat(chunks, dim=2)
    assert torch.equal(cache.keys(), expected) and torch.equal(cache.values(), -expected)
    assert cache.k.shape[2] % GROWTH_CHUNK == 0 and cache.k.shape[2] >= expected.shape[2]


def test_sliding_window_layer_keeps_the_last_tokens_without_copying_each_step():
    from kvfx.state import LayerCache

    cache = LayerCache(keep_last=4)
    tokens = [torch.full((1, 1, 1, 2), float(i)) for i in range(600)]
    for token in tokens:
        cache.append(token, token)
        cache.trim()
    assert len(cache) == 4
    assert torch.equal(cache.keys().flatten(), torch.tensor([596.0, 596, 597, 597, 598, 598, 599, 599]))
