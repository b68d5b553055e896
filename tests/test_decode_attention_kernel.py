"""CPU tests of the fused decode-attention kernel (Triton interpreter) and its reference.

Tolerances (max |kernel - ref| <= tol * max |ref|, ref computed in fp32 from the exactly
upcast inputs, i.e. *before* any output rounding):
  fp32: 1e-5 -- both sides accumulate in fp32; only summation order and exp vs exp2
        differ (observed ~1e-6).
  fp16: 1e-3 -- the kernel rounds its fp32 result to fp16 (half an ulp = 2^-11 ~ 4.9e-4
        relative), doubled for margin.
  bf16: 8e-3 -- the same output rounding with bf16's 8-bit significand (2^-9 ~ 2e-3),
        with room left for the GPU path, which also rounds softmax weights to bf16
        before the P.V product.
Under the interpreter the dot operands are upcast to fp32 (the interpreter's bf16
tl.dot is wrong) and bf16 outputs are rounded by torch (the interpreter's fp32 -> bf16
cast truncates), so only round-to-nearest output rounding differs from the reference
here (observed worst cases over 200 random cases: fp32 1.1e-6, fp16 4.3e-4, bf16 3.4e-3).
"""

import os
import sys

import torch

# Triton reads TRITON_INTERPRET once, at import.  Set it before anything imports triton,
# but only on a machine without CUDA: on the GPU machine this module may share a pytest
# process with GPU tests, and an interpreted triton there would silently interpret every
# other @triton.jit kernel too.  The decode kernels themselves do not need it: CPU
# tensors always take their interpreted variant (see kvfx.kernels.decode_attention).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kvfx.kernels.decode_attention as da  # noqa: E402
from kvfx.kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    default_num_splits,
    supports,
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _assert_close(out, ref32, dtype, what=""):
    assert out.dtype == dtype, (out.dtype, dtype)
    assert torch.isfinite(out.float()).all(), f"non-finite output {what}"
    err = (out.float() - ref32.float()).abs().max().item() if out.numel() else 0.0
    bound = TOL[dtype] * max(ref32.float().abs().max().item() if ref32.numel() else 0.0, 1e-6)
    assert err <= bound, f"{what}: max err {err:.3g} > {bound:.3g} ({dtype})"


def _ref32(q, k, v, kv_len, **kw):
    """Reference on the exactly upcast inputs (no output rounding)."""
    return decode_attention_reference(q.float(), k.float(), v.float(), kv_len, **kw)


def _cache(gen, B, Hkv, cap, D, dtype, layout):
    """A k or v cache [B, Hkv, cap, D] with last dim contiguous and the given layout."""
    if layout == "contiguous":
        return torch.randn(B, Hkv, cap, D, generator=gen).to(dtype)
    if layout == "bshd":  # HF-style [B, T, H, D] storage viewed as [B, H, T, D]
        return torch.randn(B, cap, Hkv, D, generator=gen).to(dtype).permute(0, 2, 1, 3)
    # "sliced": a slice of a bigger buffer (every other head, padded rows, offset batch)
    buf = torch.randn(B + 1, 2 * Hkv, cap + 3, D + 16, generator=gen).to(dtype)
    return buf[1:, ::2, 2 : 2 + cap, 8 : 8 + D]


def _mask(gen, kind, B, kv_len, mask_dtype):
    if kind == "none":
        return None
    if kind == "bool":
        m = torch.rand(B, kv_len, generator=gen) > 0.4
        idx = torch.randint(0, kv_len, (B,), generator=gen)
        m[torch.arange(B), idx] = True  # at least one key per row
        return m
    if kind == "bool_strided":  # non-contiguous bool mask (every other column of a wider one)
        m = torch.rand(B, 2 * kv_len, generator=gen) > 0.5
        m[:, 0] = True
        return m[:, ::2]
    if kind == "float":
        # finite biases (ALiBi-like slopes plus noise) with -inf holes
        slope = torch.rand(B, 1, generator=gen)
        pos = torch.arange(kv_len, dtype=torch.float32)[None, :]
        bias = slope * (pos - kv_len) / max(kv_len, 1) * 4.0 + torch.randn(B, kv_len, generator=gen)
        holes = torch.rand(B, kv_len, generator=gen) < 0.3
        holes[torch.arange(B), torch.randint(0, kv_len, (B,), generator=gen)] = False
        return bias.masked_fill(holes, float("-inf")).to(mask_dtype)
    if kind == "broadcast":  # stride-0 batch dim
        row = torch.randn(kv_len, generator=gen)
        row[torch.rand(kv_len, generator=gen) < 0.3] = float("-inf")
        row[kv_len - 1] = 0.5
        return row.to(mask_dtype)[None, :].expand(B, kv_len)
    if kind == "broadcast_bool":
        row = torch.rand(kv_len, generator=gen) > 0.5
        row[0] = True
        return row[None, :].expand(B, kv_len)
    raise AssertionError(kind)


@st.composite
def cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        B=draw(st.integers(1, 3)),
        Hkv=draw(st.integers(1, 4)),
        G=draw(st.sampled_from([1, 2, 4, 8])),
        D=draw(st.sampled_from([16, 32, 64, 128])),
        kv_len=draw(st.one_of(st.integers(1, 300), st.sampled_from([1, 31, 32, 33, 64, 65, 128, 257]))),
        extra=draw(st.integers(1, 40)),
        layout=draw(st.sampled_from(["contiguous", "bshd", "sliced"])),
        q_strided=draw(st.booleans()),
        mask=draw(st.sampled_from(["none", "bool", "bool_strided", "float", "broadcast", "broadcast_bool"])),
        mask_dtype=draw(st.sampled_from([torch.float32, None])),  # None: the kv dtype
        softcap=draw(st.sampled_from([0.0, 0.0, 5.0, 30.0])),
        scale=draw(st.sampled_from([None, None, 0.3])),
        num_splits=draw(st.sampled_from([None, 1, 2, 3, 4, 5])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
    )


def _build(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, Hkv, G, D, dtype = c["B"], c["Hkv"], c["G"], c["D"], c["dtype"]
    Hq, kv_len, cap = Hkv * G, c["kv_len"], c["kv_len"] + c["extra"]
    if c["q_strided"]:
        q = torch.randn(B, Hq, 2 * D, generator=gen).to(dtype)[:, :, D:]
    else:
        q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    k = _cache(gen, B, Hkv, cap, D, dtype, c["layout"])
    v = _cache(gen, B, Hkv, cap, D, dtype, c["layout"])
    # garbage beyond kv_len must never be read: poison it
    k[:, :, kv_len:] = float("nan")
    v[:, :, kv_len:] = float("nan")
    mask = _mask(gen, c["mask"], B, kv_len, c["mask_dtype"] or dtype)
    return q, k, v, mask


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_kernel_matches_reference(c):
    q, k, v, mask = _build(c)
    kw = dict(mask=mask, scale=c["scale"], softcap=c["softcap"])
    out = decode_attention(q, k, v, c["kv_len"], num_splits=c["num_splits"], **kw)
    assert out.shape == q.shape
    _assert_close(out, _ref32(q, k, v, c["kv_len"], **kw), c["dtype"], what=str(c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_gqa8_d128_odd_length(dtype, num_splits):
    """The important shape class (G=8, D=128) at a length that is no multiple of BLOCK_N."""
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, D, kv_len = 2, 2, 8, 128, 203
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, 256, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, 256, D, generator=gen).to(dtype)
    out = decode_attention(q, k, v, kv_len, num_splits=num_splits)
    _assert_close(out, _ref32(q, k, v, kv_len), dtype)
    # GQA mapping: query head h uses kv head h // G
    ref_h = decode_attention_reference(q[:, 9:10].float(), k[:, 1:2].float(), v[:, 1:2].float(), kv_len)
    _assert_close(out[:, 9:10], ref_h, dtype)


def test_default_num_splits_used_and_correct():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 32, generator=gen)
    k = torch.randn(1, 2, 300, 32, generator=gen)
    v = torch.randn(1, 2, 300, 32, generator=gen)
    out = decode_attention(q, k, v, 290)  # interpreter heuristic: 2 splits
    _assert_close(out, _ref32(q, k, v, 290), torch.float32)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("num_splits", [1, 2, 4])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_all_masked_rows_are_zero(num_splits, mask_kind):
    gen = torch.Generator().manual_seed(2)
    B, Hkv, G, D, kv_len = 3, 2, 4, 32, 150
    q = torch.randn(B, Hkv * G, D, generator=gen)
    k = torch.randn(B, Hkv, kv_len + 5, D, generator=gen)
    v = torch.randn(B, Hkv, kv_len + 5, D, generator=gen)
    keep = torch.zeros(B, kv_len, dtype=torch.bool)
    keep[0] = True  # row 0: everything
    # row 1: nothing; row 2: only the last key (earlier splits are fully masked)
    keep[2, -1] = True
    mask = keep if mask_kind == "bool" else torch.zeros(B, kv_len).masked_fill(~keep, float("-inf"))
    out = decode_attention(q, k, v, kv_len, mask=mask, num_splits=num_splits)
    ref = decode_attention_reference(q, k, v, kv_len, mask=mask)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(ref[1], torch.zeros_like(ref[1]))
    _assert_close(out, ref, torch.float32)
    # row 2 attends to one key only: output is that value row, per group
    torch.testing.assert_close(out[2].view(Hkv, G, D), v[2, :, kv_len - 1][:, None].expand(Hkv, G, D))


def test_kv_len_zero_gives_zeros():
    q = torch.randn(2, 4, 16)
    k = torch.randn(2, 2, 8, 16)
    out = decode_attention(q, k, k, 0, num_splits=2)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(decode_attention_reference(q, k, k, 0), torch.zeros_like(out))


# ----------------------------------------------------------------------------- reference


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    Hkv=st.integers(1, 4),
    G=st.sampled_from([1, 2, 4, 8]),
    D=st.sampled_from([8, 16, 64, 96]),
    kv_len=st.integers(1, 200),
    mask_kind=st.sampled_from(["none", "bool", "float"]),
    scale=st.sampled_from([None, 0.2]),
)
def test_reference_matches_sdpa_float64(seed, B, Hkv, G, D, kv_len, mask_kind, scale):
    """The reference equals torch SDPA evaluated in float64 with repeated kv heads."""
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    q = torch.randn(B, Hq, D, generator=gen)
    k = torch.randn(B, Hkv, kv_len + 3, D, generator=gen)
    v = torch.randn(B, Hkv, kv_len + 3, D, generator=gen)
    mask = None if mask_kind == "none" else _mask(gen, mask_kind, B, kv_len, torch.float32)
    ref = decode_attention_reference(q, k, v, kv_len, mask=mask, scale=scale)

    k64 = k[:, :, :kv_len].double().repeat_interleave(G, dim=1)
    v64 = v[:, :, :kv_len].double().repeat_interleave(G, dim=1)
    attn_mask = None
    if mask is not None:
        attn_mask = mask[:, None, None, :] if mask.dtype == torch.bool else mask.double()[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.double()[:, :, None], k64, v64, attn_mask=attn_mask, scale=scale
    )[:, :, 0]
    assert ref.dtype == torch.float32
    torch.testing.assert_close(ref.double(), sdpa, rtol=0, atol=1e-5 * sdpa.abs().max().item())


def test_reference_softcap_formula_float64():
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, D, kv_len, cap = 2, 2, 2, 16, 40, 7.0
    q = torch.randn(B, Hkv * G, D, generator=gen) * 4
    k = torch.randn(B, Hkv, kv_len, D, generator=gen)
    v = torch.randn(B, Hkv, kv_len, D, generator=gen)
    bias = torch.randn(B, kv_len, generator=gen)
    ref = decode_attention_reference(q, k, v, kv_len, mask=bias, softcap=cap)
    s = torch.einsum("bhd,bhnd->bhn", q.double(), k.double().repeat_interleave(G, 1)) / math.sqrt(D)
    s = cap * torch.tanh(s / cap) + bias.double()[:, None]
    expect = torch.einsum("bhn,bhnd->bhd", torch.softmax(s, -1), v.double().repeat_interleave(G, 1))
    torch.testing.assert_close(ref.double(), expect, rtol=0, atol=1e-5)


def test_reference_returns_input_dtype():
    q = torch.randn(1, 2, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    assert decode_attention_reference(q, k, k, 3).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- supports / validation


def test_supports(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k = torch.randn(1, 2, 8, 64)
    assert supports(torch.randn(1, 4, 64), k) is None  # CPU under TRITON_INTERPRET=1
    r = supports(torch.randn(1, 4, 8), torch.randn(1, 2, 8, 8))
    assert r is not None and "head_dim 8" in r
    r = supports(torch.randn(1, 4, 96), torch.randn(1, 2, 8, 96))
    assert r is not None and "head_dim 96" in r and "power of two" in r
    assert "head_dim 512" in supports(torch.randn(1, 4, 512), torch.randn(1, 2, 8, 512))
    assert "dtype" in supports(torch.randn(1, 4, 64, dtype=torch.float64), k.double())
    assert "dtype" in supports(torch.randn(1, 4, 64, dtype=torch.float16), k)
    assert "contiguous" in supports(torch.randn(1, 4, 64), torch.randn(1, 2, 64, 8).transpose(2, 3))
    assert supports(torch.randn(1, 4, 64), torch.randn(1, 3, 8, 64)) is not None


def test_supports_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(da, "triton_interpreting", lambda: False)
    assert "TRITON_INTERPRET" in supports(torch.randn(1, 4, 64), torch.randn(1, 2, 8, 64))


def test_unsupported_head_dim_raises():
    q, k = torch.randn(1, 4, 8), torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="head_dim 8"):
        decode_attention(q, k, k, 4)


@pytest.mark.parametrize("fn", [decode_attention, decode_attention_reference])
def test_shape_errors(fn):
    q = torch.randn(2, 6, 16)
    k = torch.randn(2, 4, 10, 16)
    with pytest.raises(ValueError, match="heads"):
        fn(q, k, k, 5)  # 6 % 4 != 0
    q = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="kv_len"):
        fn(q, k, k, 11)  # > Tcap
    with pytest.raises(ValueError, match="kv_len"):
        fn(q, k, k, -1)
    with pytest.raises(ValueError, match="mask"):
        fn(q, k, k, 5, mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        fn(q, k, k, 5, mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        fn(q, k, k, 5, mask=torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="v "):
        fn(q, k, k[:, :, :9], 5)
    with pytest.raises(ValueError, match="q "):
        fn(q[0], k, k, 5)
    with pytest.raises(ValueError, match="k "):
        fn(q, k[0], k, 5)
    with pytest.raises(ValueError, match="head_dim"):
        fn(torch.randn(2, 8, 32), k, k, 5)
    with pytest.raises(ValueError, match="batch"):
        fn(torch.randn(3, 8, 16), k, k, 5)
    with pytest.raises(ValueError, match="softcap"):
        fn(q, k, k, 5, softcap=-1.0)


def test_num_splits_errors():
    q, k = torch.randn(1, 2, 16), torch.randn(1, 1, 8, 16)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_splits"):
            decode_attention(q, k, k, 4, num_splits=bad)


def test_default_num_splits_heuristic():
    # H100 (132 SMs), the benchmark shape: B * Hkv = 64 programs per split, at most 2 per SM (rounded down)
    s = default_num_splits(8, 8, 32768, 132)
    assert s == 4 and 8 * 8 * s <= 2 * 132 < 8 * 8 * (s + 1)
    assert default_num_splits(8, 8, 100, 132) == 1  # short: one split
    assert default_num_splits(256, 8, 32768, 132) == 1  # big batch already fills the GPU
    assert default_num_splits(1, 1, 1 << 20, 132) <= 128
    assert default_num_splits(1, 8, 2048, 132) == 4  # >= 512 keys per split
    assert default_num_splits(2, 2, 1000, None) <= 2  # CPU / interpreter: small
    assert default_num_splits(2, 2, 0, 132) == 1
