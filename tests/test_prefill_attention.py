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
