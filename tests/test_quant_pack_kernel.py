"""KIVI quantization and packing (kvfx.kernels.quant_pack) and GEAR's compression (kvfx.kernels.gear).

CPU: the Triton quantize-and-pack kernel under the interpreter; GPU (``pytest -m gpu``): compiled, at cache sizes.
The kernel and the torch reference run the same float32 operations (IEEE division, floor, the storage dtype's
round-to-nearest-even), so they must agree bit for bit: codes, scales and offsets compared with torch.equal.
Quantization error bound, per entry: ``|x - x^| <= scale / 2`` up to float32 rounding of ``(x - min) / scale`` and
of ``code * scale + min`` (relative 2**-22 of ``|x| + (2**bits - 1) * scale`` covers both) when the parameters are
stored in float32.  With 2-byte parameters the scale and then the offset ``min - bias * scale`` are rounded first
and the codes are chosen for the stored pair: the minimum they imply is off by at most the offset's rounding,
``ulp * (|min| + bias * scale)``, and the top of the range by ``levels`` times the scale's, ``ulp * levels * scale``
(ulp 2**-11 for float16, 2**-8 covers bfloat16's 2**-9).
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvfx.kernels.gear import (  # noqa: E402
    GearTerms,
    concat_compressed,
    gear_compress_reference,
    gear_reconstruct,
    outlier_count,
)
from kvfx.kernels.quant_pack import (  # noqa: E402
    BITS,
    SCALE_DTYPES,
    Quantized,
    dequantize,
    empty_quantized,
    offset_bias,
    pack_codes,
    quantize,
    quantize_codes_reference,
    quantize_reference,
    unpack_codes,
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _data(gen, B, H, T, C, dtype, *, spread=3.0):
    """Random entries with a few flat groups (zero range) and wide outliers."""
    x = torch.randn(B, H, T, C, generator=gen) * spread
    x[..., : max(T // 4, 1), :1] = 1.25  # a flat column (keys: a zero-range group when T // 4 >= group)
    x[..., :1, : max(C // 4, 1)] = -0.5  # a flat run of channels (values: a zero-range group when C // 4 >= group)
    x[torch.rand(B, H, T, C, generator=gen) < 0.01] *= 40
    return x.to(dtype)


def _assert_same(got: Quantized, want: Quantized):
    assert got.kind == want.kind and got.bits == want.bits and got.group == want.group
    for name in ("scale", "offset", "codes"):  # parameters first: a differing scale explains differing codes
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs in {int((a.cpu() != b.cpu()).sum())} entries"


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


@settings(max_examples=30, **SETTINGS)
@given(bits=st.sampled_from(BITS), words=st.integers(1, 6), rows=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, words, rows, seed):
    per = 32 // bits
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, words * per), generator=gen)
    codes[0, :per] = (1 << bits) - 1  # all ones: a word with the sign bit set
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_bit_layout(bits):
    """Channel j * per + 2k + h of a word sits in bits [16h + k * bits, ...): the two halves hold adjacent
    channels at the same offset."""
    per = 32 // bits
    for channel in range(per):
        codes = torch.zeros(1, per, dtype=torch.int64)
        codes[0, channel] = 1
        word = int(pack_codes(codes, bits)[0, 0]) & 0xFFFFFFFF
        k, h = channel // 2, channel % 2
        assert word == 1 << (16 * h + k * bits), (channel, hex(word))


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_codes(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(1, 12, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 3"):
        unpack_codes(torch.zeros(1, 1, dtype=torch.int32), 3)


# --------------------------------------------------------------------------------------
# Quantization: the kernel equals the reference; the reference has KIVI's properties
# --------------------------------------------------------------------------------------


@settings(max_examples=12, **SETTINGS)
@given(
    kind=st.sampled_from(["keys", "values"]),
    bits=st.sampled_from(BITS),
    group=st.sampled_from([16, 32, 64]),
    C=st.sampled_from([16, 32, 64]),
    groups=st.integers(1, 3),
    scale_dtype=st.sampled_from(SCALE_DTYPES),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_kernel_equals_reference(kind, bits, group, C, groups, scale_dtype, x_dtype, strided, seed):
    if kind == "values" and group > C:
        group = C
    T = group * groups if kind == "keys" else 5 * groups + 3  # values: any number of tokens
    gen = torch.Generator().manual_seed(seed)
    x = _data(gen, 2, 2, T, C, x_dtype)
    if strided:  # [B, T, H, C] storage viewed as [B, H, T, C]
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    _assert_same(quantize(x, kind, bits, group, scale_dtype=scale_dtype),
                 quantize_reference(x, kind, bits, group, scale_dtype=scale_dtype))


@settings(max_examples=25, **SETTINGS)
@given(kind=st.sampled_from(["keys", "values"]), bits=st.sampled_from(BITS), group=st.sampled_from([8, 16, 32]),
       scale_dtype=st.sampled_from(SCALE_DTYPES), seed=st.integers(0, 2**16))
def test_quantization_error_is_half_a_step(kind, bits, group, scale_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _data(gen, 1, 2, 64, 32, torch.float32)
    codes, scale, mn = quantize_codes_reference(x, kind, bits, group, scale_dtype)
    levels = (1 << bits) - 1
    assert codes.min() >= 0 and codes.max() <= levels and torch.equal(codes, codes.round())
    qt = quantize_reference(x, kind, bits, group, scale_dtype=scale_dtype)
    xh = dequantize(qt)
    assert torch.isfinite(xh).all()
    if kind == "keys":
        s = qt.scale.float().repeat_interleave(group, dim=-2)
        true_mn = x.reshape(1, 2, 64 // group, group, 32).amin(-2).repeat_interleave(group, dim=-2)
    else:
        s = qt.scale.float().repeat_interleave(group, dim=-1)
        true_mn = x.reshape(1, 2, 64, 32 // group, group).amin(-1).repeat_interleave(group, dim=-1)
    slack = 2.0**-22 * (x.abs() + (levels + offset_bias(bits)) * s)
    if scale_dtype != torch.float32:  # the rounding of the stored scale and offset (module docstring)
        ulp = 2.0**-11 if scale_dtype == torch.float16 else 2.0**-8
        slack = slack + ulp * (true_mn.abs() + (offset_bias(bits) + levels) * s)
    err = (xh - x).abs()
    assert (err <= s / 2 + slack).all(), f"max excess {float((err - s / 2 - slack).max()):.3g}"


@pytest.mark.parametrize("kind", ["keys", "values"])
def test_zero_range_groups_are_exact(kind):
    x = torch.full((1, 1, 32, 32), 0.3)
    x[..., 16:, 16:] = torch.linspace(-1, 1, 256).reshape(16, 16)
    for bits in BITS:
        qt = quantize(x, kind, bits, 16)
        xh = dequantize(qt)
        assert torch.isfinite(xh).all()
        flat = (slice(None), slice(None), slice(0, 16), slice(0, 16))
        assert torch.equal(xh[flat], x[flat].half().float()), "a flat group must come back as its (stored) value"
        assert (unpack_codes(qt.codes, bits)[flat] == 0).all()


def test_eight_bits_has_255_levels():
    """2**8 - 1 = 255 levels (GEAR's released code would pass 8**2 - 1 = 63): a ramp of 256 values in one
    group maps to the codes 0..255 and comes back exactly."""
    ramp = torch.arange(256, dtype=torch.float32) / 8.0  # exact in float16 scale and minimum
    x = ramp.reshape(1, 1, 256, 1).expand(1, 1, 256, 16).contiguous()
    qt = quantize(x, "keys", 8, 256)
    assert torch.equal(unpack_codes(qt.codes, 8)[0, 0, :, 0], torch.arange(256))
    assert torch.equal(dequantize(qt), x)


def test_quantize_writes_into_views_of_a_larger_cache():
    gen = torch.Generator().manual_seed(3)
    x = _data(gen, 2, 2, 32, 32, torch.bfloat16)
    cache = empty_quantized(2, 2, 96, 32, "keys", 4, 16)
    cache.codes.fill_(7)
    cache.scale.fill_(9.0)
    view = Quantized(cache.codes[:, :, 32:64], cache.scale[:, :, 2:4], cache.offset[:, :, 2:4], 4, 16, "keys")
    quantize(x, "keys", 4, 16, out=view)
    _assert_same(view, quantize_reference(x, "keys", 4, 16))
    assert (cache.codes[:, :, :32] == 7).all() and (cache.codes[:, :, 64:] == 7).all()
    assert (cache.scale[:, :, :2] == 9.0).all() and (cache.scale[:, :, 4:] == 9.0).all()


def test_quantize_rejects_bad_input():
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 3"):
        quantize(x, "keys", 3, 16)
    with pytest.raises(ValueError, match="group 24 must divide head_dim 32"):
        quantize(x, "values", 4, 24)
    with pytest.raises(ValueError, match="group 64 must divide the number of key tokens 32"):
        quantize(x, "keys", 4, 64)
    with pytest.raises(ValueError, match="kind must be one of"):
        quantize(x, "queries", 4, 16)
    with pytest.raises(ValueError, match="head_dim 12 must be a multiple of 16"):
        quantize_reference(torch.randn(1, 1, 32, 12), "values", 2, 4)
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        quantize(x, "keys", 4, 16, scale_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\[B, H, T, C\]"):
        quantize(x[0], "keys", 4, 16)
    with pytest.raises(ValueError, match="power-of-two head_dim and group"):
        quantize(torch.randn(1, 1, 24, 48), "keys", 4, 24)
    bad_out = empty_quantized(1, 1, 32, 32, "keys", 2, 16)
    with pytest.raises(ValueError, match=r"out has \(bits, group, kind\)"):
        quantize(x, "keys", 4, 16, out=bad_out)


# --------------------------------------------------------------------------------------
# GEAR compression (torch reference)
# --------------------------------------------------------------------------------------


def _low_rank_data(gen, B=1, H=2, T=128, C=32):
    """Rank-3 structure + noise + sparse large outliers: each of GEAR's terms has something to catch."""
    x = torch.randn(B, H, T, 3, generator=gen) @ torch.randn(B, H, 3, C, generator=gen)
    x = x + 0.2 * torch.randn(B, H, T, C, generator=gen)
    spikes = torch.rand(B, H, T, C, generator=gen) < 0.01
    return torch.where(spikes, 25.0 * torch.randn(B, H, T, C, generator=gen), x)


@pytest.mark.parametrize("kind", ["keys", "values"])
@pytest.mark.parametrize("bits", [2, 4])
def test_gear_error_falls_with_each_term(kind, bits):
    """GEAR's ablation: quantization alone > + low-rank > + low-rank + outliers (Frobenius error)."""
    x = _low_rank_data(torch.Generator().manual_seed(bits))
    errs = []
    for rank, outliers in ((0, 0.0), (4, 0.0), (4, 0.1)):
        qt, terms = gear_compress_reference(x, kind, bits, 32, rank, outliers, lr_block=32)
        errs.append(float((gear_reconstruct(qt, terms) - x).norm()))
    assert errs[0] > errs[1] > errs[2], errs


@pytest.mark.parametrize("kind", ["keys", "values"])
def test_gear_outliers_come_back_exactly(kind):
    x = _low_rank_data(torch.Generator().manual_seed(5))
    qt, terms = gear_compress_reference(x, kind, 2, 32, 2, 0.2, lr_block=32)
    n = outlier_count(0.2, 32)
    assert n == 3 and terms.n_out == 2 * n
    xh = gear_reconstruct(qt, terms)
    rows = x.reshape(1, 2, 4, 32, 32).transpose(-1, -2) if kind == "keys" else x
    order = rows.argsort(dim=-1, stable=True)
    picked = torch.cat([order[..., :n], order[..., -n:]], -1)
    recon = xh.reshape(1, 2, 4, 32, 32).transpose(-1, -2) if kind == "keys" else xh
    want, got = rows.gather(-1, picked), recon.gather(-1, picked)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())
    # the low-rank factor A has orthonormal columns (QR in the last iteration)
    a = terms.lr_a.float()
    eye = torch.eye(2).expand(1, 2, 2, 2)
    assert torch.allclose(a.transpose(-1, -2) @ a, eye, atol=2e-3)  # float16 storage


def test_gear_segments_and_counts():
    x = _low_rank_data(torch.Generator().manual_seed(7), T=96)
    parts = [gear_compress_reference(x[:, :, :64], "keys", 4, 32, 4, 0.0, lr_block=32),
             gear_compress_reference(x[:, :, 64:], "keys", 4, 32, 2, 0.0, lr_block=32)]
    qt, terms = concat_compressed(parts)
    assert terms.lr_a.shape[-1] == 4 and terms.lr_b.shape[2] == 2
    assert terms.lr_seg.flatten().tolist() == [0, 0, 1]
    joined = gear_reconstruct(qt, terms)
    separate = torch.cat([gear_reconstruct(*parts[0]), gear_reconstruct(*parts[1])], dim=2)
    assert torch.allclose(joined, separate, atol=1e-6)
    assert outlier_count(0.02, 32) == 0 and outlier_count(0.02, 128) == 1 and outlier_count(0.0, 64) == 0
    with pytest.raises(ValueError, match=r"outliers must be a fraction in \[0, 0.5\), got 0.5"):
        outlier_count(0.5, 32)
    with pytest.raises(ValueError, match="rank must be an int in"):
        gear_compress_reference(x, "keys", 4, 32, 17, 0.0)
    with pytest.raises(ValueError, match="lr_block must be a positive multiple of 16"):
        gear_compress_reference(x, "keys", 4, 32, 2, 0.0, lr_block=24)
    with pytest.raises(ValueError, match="part 0 has 48 tokens, not a multiple of lr_block 32"):
        concat_compressed([gear_compress_reference(x[:, :, :48], "values", 4, 32, 2, 0.0, lr_block=32), parts[1]])
    assert isinstance(terms, GearTerms)


# --------------------------------------------------------------------------------------
# GPU: the compiled kernel at cache sizes
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["keys", "values"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_gpu_equals_reference(kind, bits, group):
    gen = torch.Generator().manual_seed(bits * group)
    x = _data(gen, 2, 8, 4096, 128, torch.bfloat16).cuda()
    for scale_dtype in SCALE_DTYPES:
        got = quantize(x, kind, bits, group, scale_dtype=scale_dtype)
        # the ground truth is the CPU reference: torch on CUDA divides by a Python scalar through its reciprocal,
        # not with IEEE division as the kernel and the CPU do
        _assert_same(got, quantize_reference(x.cpu(), kind, bits, group, scale_dtype=scale_dtype))
