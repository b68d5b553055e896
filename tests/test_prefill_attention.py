"""kvfx.kernels.prefill_attention: a long prompt's mask is attended in chunks of query rows, with the same result."""

import pytest
import torch
import torch.nn.functional as F

from kvfx.kernels import prefill_attention as pa


def _inputs(kind, B=2, Hq=4, Hkv=2, T=300, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[1, :37] = False  # left padding of row 1
    mask = causal[None, None] & padding[:, None, None, :]
    mask[1, :, :37, 0] = True  # padded query rows see one key (no all-masked row: SDPA would give NaN)
    if kind == "float":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    return q, k, v, mask


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_chunked_rows_equal_one_call(kind, monkeypatch):
    q, k, v, mask = _inputs(kind)
    whole = pa.prefill_attention(q, k, v, mask=mask, scale=0.25)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(pa.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a[0].shape[2]) or
                        sdpa(*a, **kw))
    per_row = 2 * 1 * 300 * 4  # B * mask heads * Tk * bytes of q's dtype
    monkeypatch.setattr(pa, "MASK_CHUNK_BYTES", 128 * per_row)  # 128 rows per call
    chunked = pa.prefill_attention(q, k, v, mask=mask, scale=0.25)
    assert calls == [128, 128, 44]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_no_chunks_without_a_per_row_mask(monkeypatch):
    q, k, v, mask = _inputs("bool")
    monkeypatch.setattr(pa, "MASK_CHUNK_BYTES", 1)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(pa.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a[0].shape[2]) or
                        sdpa(*a, **kw))
    pa.prefill_attention(q, k, v, mask=None, scale=0.25, is_causal=True)  # SDPA's causal mode: no mask tensor
    pa.prefill_attention(q, k, v, mask=mask[:, :, -1:], scale=0.25)  # one row for every query
    assert calls == [300, 300]


def test_cpu_inputs_are_expanded_not_handed_to_sdpa_as_gqa(monkeypatch):
    q, k, v, _ = _inputs("bool")
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(pa.F, "scaled_dot_product_attention", lambda *a, **kw: seen.append((a[1].shape[1], kw)) or
                        sdpa(*a, **kw))
    pa.prefill_attention(q, k, v, scale=0.25, is_causal=True)
    assert seen == [(4, {"attn_mask": None, "scale": 0.25, "is_causal": True})]  # 2 KV heads expanded to 4


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_on_the_gpu_unexpanded_gqa_equals_the_expanded_heads_and_saves_their_memory(causal):
    """Flash attention with enable_gqa reads each KV head for its query group: the same attention as the expanded
    heads (bf16 outputs of the same kernel family: equal within one bf16 rounding, 2**-8 relative), without the
    2 * Hq / Hkv copies of the keys' bytes."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, T, D = 2, 8, 2, 4096, 64
    # token-major, as the compiled graph hands them over (the projections' layout, kept through RoPE by inductor)
    q, k, v = (torch.randn(B, T, h, D, generator=gen, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for h in (Hq, Hkv, Hkv))
    assert pa._flash_gqa(q, k, v, causal)
    expanded = F.scaled_dot_product_attention(q, pa.repeat_kv(k, Hq), pa.repeat_kv(v, Hq), scale=0.125,
                                              is_causal=causal)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = pa.prefill_attention(q, k, v, scale=0.125, is_causal=causal)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(out, expanded, rtol=1e-2, atol=1e-2)
    key_bytes = k.numel() * k.element_size()
    assert extra < out.numel() * out.element_size() + key_bytes  # the output and SDPA's small buffers only
    assert out.transpose(1, 2).is_contiguous()  # the inputs' layout: kvfx::attention's own, so no copy follows
