"""Decode attention over a quantized cache (kvfx.kernels.quant_decode_attention): kernel == dequantize-then-attend.

CPU: the kernels under the Triton interpreter (float32 dequantization and dots); GPU (``pytest -m gpu``): compiled,
with the PTX float16 dequantization.  KIVI cases run both kernels (KVFX_QUANT_PLANES: the channel-order split
kernel and the plane-order kernel; the latter with its value codes read as bytes, as it does when int16 lanes are
too few, and as int16 lanes); GEAR cases run the split kernel.  Each case quantizes random keys and values (keys
and values quantized up to different points, as KIVI does, with stale codes and residual rows past the live ones
that must not be read), adds residual tokens in q's dtype, a mask (none, bool, float) and optionally GEAR terms
(two low-rank segments of different rank, outliers), and compares with the float32 reference on the same stored
tensors:
    max |kernel - ref| <= tol * max |ref|
  float32 1e-5 (interpreted: float32 everywhere, only summation order differs; observed ~1e-6);
  bfloat16 8e-3 (output rounding 2^-9 relative, doubled, and on the GPU the float16 dequantized tiles and
  softmax weights, 2^-11 each; the plane kernel's float16 q * scale and key minimums, 2^-11 each); float16 2e-3
  (output rounding 2^-11, the same float16 tiles and weights).
The PTX itself is checked on the CPU by emulating its instructions bit for bit.
"""

import contextlib
import math
import os
import re
import sys
from unittest import mock

import numpy as np
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kvfx.kernels.quant_decode_attention as qda  # noqa: E402
from kvfx.kernels.decode_attention import decode_attention_reference, triton_interpreting  # noqa: E402
from kvfx.kernels.gear import GearTerms, concat_compressed, gear_compress_reference  # noqa: E402
from kvfx.kernels.quant_decode_attention import (  # noqa: E402
    kv_bytes,
    quant_decode_attention,
    quant_decode_attention_reference,
    supports,
)
from interpreter_bounds import bounds_checked  # noqa: E402
from kvfx.kernels.quant_pack import (  # noqa: E402
    Quantized,
    dequantize,
    offset_bias,
    quantize,
    quantize_reference,
    unpack_codes,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}
# KIVI kernels: "split" (channel order), "planes" (plane order; value codes as bytes where int16 lanes are fewer
# than the kernel's VALUE_N, i.e. always at the interpreter's head dims <= 64), "planes16" (int16 value lanes)
PATHS = ["split", "planes", "planes16"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _with_stale_rows(qt: Quantized, extra: int, gen) -> Quantized:
    """The same cache with ``extra`` more token rows of garbage codes and parameters (capacity past the live
    tokens): a kernel that reads them gives a wrong answer."""
    if extra == 0:
        return qt
    rows = extra if qt.kind == "values" else extra // qt.group
    junk = lambda t, n: torch.randint(-2**31, 2**31 - 1, (*t.shape[:2], n, t.shape[3]), generator=gen,  # noqa: E731
                                      dtype=torch.int64).to(t.dtype) if t.dtype == torch.int32 else \
        (1e3 * torch.rand(*t.shape[:2], n, t.shape[3], generator=gen)).to(t.dtype)
    return Quantized(torch.cat([qt.codes, junk(qt.codes, extra)], 2), torch.cat([qt.scale, junk(qt.scale, rows)], 2),
                     torch.cat([qt.offset, junk(qt.offset, rows)], 2), qt.bits, qt.group, qt.kind)


def _gear_part(x, kind, bits, group, lr_block, rank, outliers):
    return gear_compress_reference(x, kind, bits, group, rank, outliers, lr_block=lr_block)


def _case(seed, *, B=1, Hkv=2, G=2, D=32, Dv=32, kbits=4, vbits=4, kgroup=16, vgroup=16, nqk=64, nqv=48,
          kv_len=80, dtype=torch.float32, mask_kind="none", softcap=0.0, gear=False, lr_block=32, outliers=0.2,
          device="cpu"):
    """(args, kwargs) of quant_decode_attention; GEAR: the quantized part in two separately compressed segments."""
    gen = torch.Generator().manual_seed(seed)
    xk = torch.randn(B, Hkv, kv_len, D, generator=gen)
    xv = torch.randn(B, Hkv, kv_len, Dv, generator=gen)
    xk[..., :3] += 4.0  # outlier channels, as real keys have
    if gear:  # two segments (prompt, then a block), rank 4 and 2, the boundary on a multiple of lr_block
        def compress(x, n, kind, bits, group):
            cut = (n // 2) // lr_block * lr_block
            cut = cut - cut % group if kind == "keys" else cut
            if cut == 0 or cut == n:
                return _gear_part(x[:, :, :n], kind, bits, group, lr_block, 4, outliers)
            return concat_compressed([_gear_part(x[:, :, :cut], kind, bits, group, lr_block, 4, outliers),
                                      _gear_part(x[:, :, cut:n], kind, bits, group, lr_block, 2, outliers)])
        keys, k_gear = compress(xk, nqk, "keys", kbits, kgroup)
        values, v_gear = compress(xv, nqv, "values", vbits, vgroup)
    else:
        keys, k_gear = quantize_reference(xk[:, :, :nqk], "keys", kbits, kgroup), None
        values, v_gear = quantize_reference(xv[:, :, :nqv], "values", vbits, vgroup), None
        keys = _with_stale_rows(keys, kgroup, gen)
        values = _with_stale_rows(values, 3, gen)
    stale = 5  # residual rows past kv_len: garbage that must not be read
    k_res = torch.cat([xk[:, :, nqk:], 1e4 * torch.ones(B, Hkv, stale, D)], 2).to(dtype)
    v_res = torch.cat([xv[:, :, nqv:], 1e4 * torch.ones(B, Hkv, stale, Dv)], 2).to(dtype)
    q = (torch.randn(B, Hkv * G, D, generator=gen) * 1.5).to(dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, kv_len, generator=gen) > 0.3
        mask[:, -1] = True
    elif mask_kind == "float":
        mask = torch.where(torch.rand(B, kv_len, generator=gen) > 0.3, -2.0 * torch.rand(B, kv_len, generator=gen),
                           torch.finfo(torch.float32).min)
        mask[:, -1] = 0.0
        mask = mask.to(dtype)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    mq = lambda qt: Quantized(qt.codes.to(device), qt.scale.to(device), qt.offset.to(device), qt.bits,  # noqa: E731
                              qt.group, qt.kind)
    mg = lambda g: None if g is None else GearTerms(mv(g.lr_a), mv(g.lr_b), mv(g.lr_seg), g.lr_block,  # noqa: E731
                                                   mv(g.out_idx), mv(g.out_val))
    args = (q.to(device), mq(keys), mq(values), k_res.to(device), v_res.to(device))
    kwargs = dict(k_quantized=nqk, v_quantized=nqv, kv_len=kv_len, mask=mv(mask), softcap=softcap,
                  scale=D**-0.5 * 1.3, k_gear=mg(k_gear), v_gear=mg(v_gear))
    return args, kwargs


@contextlib.contextmanager
def _path(path):
    """Run quant_decode_attention's KIVI cases on the given kernel (see PATHS)."""
    with mock.patch.dict(os.environ, {"KVFX_QUANT_PLANES": "0" if path == "split" else "1"}), \
            mock.patch.object(qda, "_INTERPRET_VALUE_N", 1 if path == "planes16" else qda._INTERPRET_VALUE_N):
        yield


def _reference(args, kwargs):
    q, keys, values, k_res, v_res = args
    kw = dict(kwargs)
    if kw["mask"] is not None and kw["mask"].is_floating_point():
        kw["mask"] = kw["mask"].float()
    return quant_decode_attention_reference(q.float(), keys, values, k_res.float(), v_res.float(), **kw)


def _check(out, ref, dtype, what=""):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(ref).all() and torch.isfinite(out.float()).all()
    err = (out.float() - ref.float()).abs().max().item()
    bound = TOL[dtype] * max(ref.float().abs().max().item(), 1e-6)
    assert err <= bound, f"{what}: max err {err:.3g} > {bound:.3g}"


# --------------------------------------------------------------------------------------
# CPU (interpreter)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, **SETTINGS)
@given(
    kbits=st.sampled_from([2, 4, 8]),
    vbits=st.sampled_from([2, 4, 8]),
    kgroup=st.sampled_from([16, 32, 64]),
    vgroup=st.sampled_from([8, 16, 32]),
    G=st.sampled_from([1, 2, 3]),
    D=st.sampled_from([16, 32]),
    nq=st.tuples(st.integers(0, 3), st.integers(0, 70)),
    res=st.integers(0, 20),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    mask_kind=st.sampled_from(["none", "bool", "float"]),
    softcap=st.sampled_from([0.0, 0.0, 5.0]),
    num_splits=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_reference(path, kbits, vbits, kgroup, vgroup, G, D, nq, res, dtype, mask_kind, softcap,
                                 num_splits, seed):
    vgroup = max(vgroup, 32 // vbits)  # a word of value codes stays in one group
    vgroup = min(vgroup, D)
    nqk = nq[0] * kgroup
    nqv = nq[1]
    kv_len = max(nqk, nqv) + res
    if kv_len == 0:
        kv_len, nqv = 1, 0
    args, kwargs = _case(seed, B=1, Hkv=2, G=G, D=D, Dv=D, kbits=kbits, vbits=vbits, kgroup=kgroup, vgroup=vgroup,
                         nqk=nqk, nqv=nqv, kv_len=kv_len, dtype=dtype, mask_kind=mask_kind, softcap=softcap)
    with _path(path):
        out = quant_decode_attention(*args, **kwargs, num_splits=num_splits)
    _check(out, _reference(args, kwargs), dtype, path)


@pytest.mark.parametrize("path", ["planes", "planes16"])
@pytest.mark.parametrize("bits", [(4, 4), (2, 2), (8, 4), (2, 8)])
def test_plane_kernel_at_model_head_dim(path, bits):
    """d = 128 as in the models (the planes as wide as on the GPU: 32 int16 key lanes at 4 bits, 16 at 2), four
    query heads per KV head, key groups narrower than a tile (stacked rows) and wider, a bulk and a tail phase."""
    kbits, vbits = bits
    for kgroup, vgroup, nqk, nqv, kv_len, num_splits in [(16, 32, 96, 80, 100, 2), (64, 128, 64, 70, 90, 1)]:
        args, kwargs = _case(kbits * 10 + vbits + kgroup, B=1, Hkv=2, G=4, D=128, Dv=128, kbits=kbits, vbits=vbits,
                             kgroup=kgroup, vgroup=vgroup, nqk=nqk, nqv=nqv, kv_len=kv_len, mask_kind="bool")
        with _path(path):
            out = quant_decode_attention(*args, **kwargs, num_splits=num_splits)
        _check(out, _reference(args, kwargs), torch.float32, f"{path} {bits} g{kgroup}")


@settings(max_examples=8, **SETTINGS)
@given(bits=st.sampled_from([2, 4]), kgroup=st.sampled_from([16, 32]), lr_block=st.sampled_from([16, 32]),
       mask_kind=st.sampled_from(["none", "bool"]), num_splits=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_gear_kernel_equals_reference(bits, kgroup, lr_block, mask_kind, num_splits, seed):
    """Low-rank terms over two segments of different rank and outliers on both sides, plus residual tokens."""
    args, kwargs = _case(seed, B=1, Hkv=1, G=2, D=32, Dv=32, kbits=bits, vbits=bits, kgroup=kgroup, vgroup=16,
                         nqk=64, nqv=64, kv_len=70, mask_kind=mask_kind, gear=True, lr_block=lr_block)
    k_gear, v_gear = kwargs["k_gear"], kwargs["v_gear"]
    assert k_gear.lr_b.shape[2] == 2 and k_gear.n_out > 0 and v_gear.n_out > 0  # the case has every term
    ref = _reference(args, kwargs)
    _check(quant_decode_attention(*args, **kwargs, num_splits=num_splits), ref, torch.float32)
    plain = quant_decode_attention_reference(*args, **{**kwargs, "k_gear": None, "v_gear": None})
    assert (plain - ref).abs().max() > 1e-3, "the GEAR terms must change the result"


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("path", ["planes", "planes16"])
def test_plane_kernel_reads_nothing_past_the_stored_tokens(path, num_splits):
    """Regression (H100, llama-1b kivi-4 at B=1 T=32768: an illegal memory access, only in some allocation layouts):
    with tiles of several key groups (BLOCK_N 128 > K_GROUP 32, as on the GPU), the tail's 16-token tiles loaded
    the scales and offsets of the key groups after the tile's own, one group past the last stored one when the
    store holds exactly the quantized tokens. Interpreted with such tiles, every access bounds-checked."""
    kg, nqk, nqv, kv_len = 32, 128, 100, 140
    (q, keys, values, k_res, v_res), kwargs = _case(7, B=1, Hkv=2, G=4, D=32, Dv=32, kgroup=kg, vgroup=16, nqk=nqk,
                                                    nqv=nqv, kv_len=kv_len)

    def exact(qt, tokens, rows):  # storage for exactly the stored tokens: nothing after them to read by mistake
        return Quantized(qt.codes[:, :, :tokens].clone(), qt.scale[:, :, :rows].clone(),
                         qt.offset[:, :, :rows].clone(), qt.bits, qt.group, qt.kind)

    args = (q, exact(keys, nqk, nqk // kg), exact(values, nqv, nqv), k_res[:, :, : kv_len - nqk].clone(),
            v_res[:, :, : kv_len - nqv].clone())
    with _path(path), mock.patch.dict(qda._INTERPRET_CONFIG, BLOCK_N=4 * kg), bounds_checked():
        out = quant_decode_attention(*args, **kwargs, num_splits=num_splits)
    _check(out, _reference(args, kwargs), torch.float32)


@pytest.mark.parametrize("gear", [False, True])
def test_reference_is_fake_quantize_then_attention(gear):
    """The reference equals the paper-faithful recipe written independently: fake-quantize the cache (dequantize
    or GEAR's reconstruction), then torch's SDPA with GQA over [quantized tokens, residual tokens]."""
    args, kwargs = _case(11, B=2, Hkv=2, G=2, nqk=64, nqv=48, kv_len=70, mask_kind="bool", gear=gear)
    q, keys, values, k_res, v_res = args
    if gear:
        from kvfx.kernels.gear import gear_reconstruct

        kq, vq = gear_reconstruct(keys, kwargs["k_gear"], 64), gear_reconstruct(values, kwargs["v_gear"], 48)
    else:
        kq, vq = dequantize(keys, 64), dequantize(values, 48)
    k = torch.cat([kq, k_res[:, :, :6]], 2)
    v = torch.cat([vq, v_res[:, :, :22]], 2)
    want = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=kwargs["mask"][:, None, None, :],
                                          scale=kwargs["scale"], enable_gqa=True)[:, :, 0]
    got = quant_decode_attention_reference(*args, **kwargs)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_edges(path):
    with _path(path):
        # nothing quantized yet: plain attention over the residual tokens
        args, kwargs = _case(1, nqk=0, nqv=0, kv_len=20)
        q, keys, values, k_res, v_res = args
        want = decode_attention_reference(q, k_res[:, :, :20], v_res[:, :, :20], 20, scale=kwargs["scale"])
        _check(quant_decode_attention(*args, **kwargs), want, torch.float32, "no codes")
        # everything quantized, no residual token; more splits than tiles
        args, kwargs = _case(2, nqk=64, nqv=64, kv_len=64)
        _check(quant_decode_attention(*args, **kwargs, num_splits=5), _reference(args, kwargs), torch.float32,
               "no res")
        # a row with every token masked gives zeros
        args, kwargs = _case(3, B=2, nqk=32, nqv=40, kv_len=48, mask_kind="bool")
        kwargs["mask"][1] = False
        out = quant_decode_attention(*args, **kwargs, num_splits=2)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        _check(out[:1], _reference(args, kwargs)[:1], torch.float32, "masked row")


def test_plane_kernel_selection_and_configs():
    """Which inputs the plane kernel takes when compiled, and its launch configurations (pure Python)."""
    keys4 = quantize_reference(torch.randn(1, 1, 32, 128), "keys", 4, 32)
    vals2 = quantize_reference(torch.randn(1, 1, 32, 128), "values", 2, 32)
    keys2_64 = quantize_reference(torch.randn(1, 1, 32, 64), "keys", 2, 32)
    vals2_64 = quantize_reference(torch.randn(1, 1, 32, 64), "values", 2, 32)
    with _path("planes"):
        assert qda._use_planes(keys4, vals2, 128, 128, 4, False, False)  # 2-bit values: 32 byte lanes
        assert not qda._use_planes(keys4, vals2, 128, 128, 4, True, False)  # GEAR: the split kernel
        assert not qda._use_planes(keys2_64, vals2_64, 64, 64, 4, False, False)  # 8 key lanes: K < 16
        assert not qda._use_planes(keys4, vals2, 128, 128, 32, False, False)  # 32 rows
        assert qda._use_planes(keys2_64, vals2_64, 64, 64, 4, False, True)  # the interpreter takes everything
    with _path("split"):
        assert not qda._use_planes(keys4, vals2, 128, 128, 4, False, False)
    assert qda._plane_value_lanes(128, 2, 32) == 32 and qda._plane_value_lanes(128, 4, 32) == 32
    assert qda._plane_value_lanes(128, 8, 32) == 64 and qda._plane_value_lanes(64, 4, 32) == 32
    configs = qda._plane_autotune_configs()
    for g_p2, k_group in [(1, 16), (4, 32), (4, 16), (8, 32), (16, 32), (16, 128)]:
        kept = qda._plane_prune_configs(configs, {}, QGROUP_P2=g_p2, K_GROUP=k_group)
        assert kept and all(qda._plane_rows(c.kwargs["BLOCK_N"], k_group, g_p2) <= max(16, g_p2) for c in kept)
        fixed = qda._plane_fixed_config(k_group, g_p2)
        assert qda._plane_rows(fixed["BLOCK_N"], k_group, g_p2) <= max(16, g_p2), (g_p2, k_group, fixed)
    assert all(c.num_warps == 4 for c in configs)


def test_kv_bytes_counts_every_stored_tensor():
    args, kwargs = _case(4, B=1, Hkv=1, D=32, kbits=4, vbits=2, kgroup=16, vgroup=16, nqk=64, nqv=48, kv_len=80)
    q, keys, values, k_res, v_res = args
    got = kv_bytes(keys, values, k_res, v_res, k_quantized=64, v_quantized=48, kv_len=80)
    want = (64 * 32 // 2 + 2 * 4 * 32 * 2) + (48 * 32 // 4 + 2 * 48 * 2 * 2) + (16 + 32) * 32 * 4
    assert got == want


# --------------------------------------------------------------------------------------
# The PTX, emulated bit for bit
# --------------------------------------------------------------------------------------


def _f16(bits16: int) -> np.float16:
    return np.array([bits16], dtype=np.uint16).view(np.float16)[0]


def _bits(x) -> int:
    return int(np.array([x], dtype=np.float16).view(np.uint16)[0])


def _emulate_ptx(asm: str, operands: dict) -> int:
    """Run the instructions the dequantization PTX uses on Python ints (32-bit registers); returns the registers."""
    regs = dict(operands)
    val = lambda a: regs[a] if a in regs else int(a, 0)  # noqa: E731
    halves = lambda r: (_f16(r & 0xFFFF), _f16(r >> 16))  # noqa: E731
    pack = lambda lo, hi: _bits(lo) | (_bits(hi) << 16)  # noqa: E731
    for ins in filter(None, (part.strip() for part in asm.strip("{} ").split(";"))):
        op, _, rest = ins.partition(" ")
        ops = [o.strip() for o in rest.split(",")]
        if op == ".reg":
            continue
        if op in ("shr.b32", "shl.b32"):
            a, c = val(ops[1]), val(ops[2])
            assert 0 <= c < 32
            regs[ops[0]] = (a >> c) if op == "shr.b32" else (a << c) & 0xFFFFFFFF
        elif op == "prmt.b32":  # byte i of the result: byte (selector nibble i) & 7 of {b, a}
            a, b, c = val(ops[1]), val(ops[2]), val(ops[3])
            src = a | (b << 32)
            regs[ops[0]] = sum(((src >> (8 * ((c >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "mov.b32":
            regs[ops[0]] = val(ops[1]) & 0xFFFFFFFF
        elif op == "shf.l.wrap.b32":  # funnel shift of {b, a} left by c mod 32, upper half; a == b: a rotation
            a, c = val(ops[1]), val(ops[3]) % 32
            assert ops[1] == ops[2]
            regs[ops[0]] = ((a << c) | (a >> (32 - c))) & 0xFFFFFFFF if c else a
        elif op == "lop3.b32":
            a, b, c, lut = (val(o) for o in ops[1:5])
            out = 0
            for i in range(32):
                idx = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1)
                out |= ((lut >> idx) & 1) << i
            regs[ops[0]] = out
        elif op == "sub.f16x2":
            (a0, a1), (b0, b1) = halves(val(ops[1])), halves(val(ops[2]))
            sub = lambda x, y: np.float16(np.float64(x) - np.float64(y))  # noqa: E731
            regs[ops[0]] = pack(sub(a0, b0), sub(a1, b1))
        elif op == "fma.rn.f16x2":  # exact product and sum in float64, one rounding to float16
            (a0, a1), (b0, b1), (c0, c1) = (halves(val(o)) for o in ops[1:4])
            f = lambda x, y, z: np.float16(np.float64(x) * np.float64(y) + np.float64(z))  # noqa: E731
            regs[ops[0]] = pack(f(a0, b0, c0), f(a1, b1, c1))
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
    return regs


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ptx_dequantizes_each_plane(bits):
    """For every plane k, rotated by _plane_rotation(bits, k), the PTX gives in its two float16 halves
    round16(code * scale + min) of the two adjacent channels the packed word holds at plane k, from the stored
    scale and offset = min - offset_bias(bits) * scale."""
    asm = qda._asm_dequant(bits)
    assert set(re.findall(r"\$\d", asm)) == {"$0", "$1", "$2", "$3", "$4"}
    rng = np.random.default_rng(bits)
    planes, bias = 16 // bits, offset_bias(bits)
    for _ in range(40):
        word = int(rng.integers(0, 2**32))
        codes = unpack_codes(torch.tensor([[word - (1 << 32) if word >= 1 << 31 else word]], dtype=torch.int32),
                             bits)[0].tolist()
        s = [np.float16(rng.uniform(0.001, 3.0)) for _ in range(2)]
        off = [np.float16(rng.uniform(-40.0, 40.0)) for _ in range(2)]
        for k in range(planes):
            regs = _emulate_ptx(asm, {"$1": word, "$2": _bits(s[0]) | _bits(s[1]) << 16,
                                      "$3": _bits(off[0]) | _bits(off[1]) << 16, "$4": qda._plane_rotation(bits, k)})
            out = regs["$0"]
            for h in range(2):
                code = codes[2 * k + h]
                minimum = np.float64(off[h]) + bias * np.float64(s[h])  # exact in float64
                want = np.float16(np.float64(code) * np.float64(s[h]) + minimum)
                assert _bits(want) == (out >> (16 * h)) & 0xFFFF, (bits, k, h, code)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_key_ptx_gives_magic_plus_code_for_each_plane(bits):
    """The plane kernel's key PTX: for every plane k, rotated and masked with _key_plane_consts(bits, k) (the
    kernel rebuilds them from _key_plane_table), each float16 half is exactly C_k + code of its channel, C_k a power
    of two; the planes share at most three rotations; C_k small (the bias cancels C_k q s in float32)."""
    rng = np.random.default_rng(bits)
    planes = 16 // bits
    rot_table, pos_table = qda._key_plane_table(bits)
    consts = [qda._key_plane_consts(bits, k) for k in range(planes)]
    assert len({c[0] for c in consts}) <= 3 and max(c[4] for c in consts) <= 256
    for k, (shift, a, mask, magic, C) in enumerate(consts):
        assert (rot_table >> (5 * k)) & 31 == shift % 32 and (pos_table >> (4 * k)) & 15 == a
        assert a + bits <= 10 and a >= max(shift, 0) and C == 2 ** (10 - a)
    for _ in range(40):
        word = int(rng.integers(0, 2**32))
        codes = unpack_codes(torch.tensor([[word - (1 << 32) if word >= 1 << 31 else word]], dtype=torch.int32),
                             bits)[0].tolist()
        for k, (shift, a, mask, magic, C) in enumerate(consts):
            out = _emulate_ptx(qda._KEY_CODES_ASM, {"$1": word, "$2": shift % 32, "$4": mask, "$6": magic})["$0"]
            for h in range(2):
                assert float(_f16((out >> (16 * h)) & 0xFFFF)) == C + codes[2 * k + h], (bits, k, h)


@pytest.mark.parametrize("bits", [2, 4])
def test_byte_ptx_dequantizes_every_plane(bits):
    """The plane kernel's byte-lane value PTX: four bytes of a word (pack=4), every code of each, into
    round16(code * scale + min) with the stored scale and offset of its byte (as test_ptx_dequantizes_each_plane),
    plane k of bytes 0, 1 in output 2k, of bytes 2, 3 in output 2k + 1; byte j's codes are those of the word at
    channels (j // 2) * P + 2k + j % 2... as the kernel maps them (lane 4w + j of word w)."""
    asm = qda._asm_dequant_bytes(bits)
    planes, n = 8 // bits, 2 * (8 // bits)
    assert set(re.findall(r"\$\d+", asm)) == {f"${i}" for i in range(n + 5)}
    rng = np.random.default_rng(10 + bits)
    bias, P = offset_bias(bits), 16 // bits
    for _ in range(40):
        word = int(rng.integers(0, 2**32))
        codes = unpack_codes(torch.tensor([[word - (1 << 32) if word >= 1 << 31 else word]], dtype=torch.int32),
                             bits)[0].tolist()
        s = [np.float16(rng.uniform(0.001, 3.0)) for _ in range(4)]
        off = [np.float16(rng.uniform(-40.0, 40.0)) for _ in range(4)]
        regs = _emulate_ptx(asm, {f"${n}": word, f"${n + 1}": _bits(s[0]) | _bits(s[1]) << 16,
                                  f"${n + 2}": _bits(s[2]) | _bits(s[3]) << 16,
                                  f"${n + 3}": _bits(off[0]) | _bits(off[1]) << 16,
                                  f"${n + 4}": _bits(off[2]) | _bits(off[3]) << 16})
        for k in range(planes):
            for j in range(4):  # byte j: half j // 2, byte j % 2 of the half
                channel = (j % 2) * P + 2 * k + j // 2  # (the kernel's vch0 for lane 4w + j, plane k; w = 0)
                code = codes[channel]
                assert code == (word >> (8 * j + k * bits)) & ((1 << bits) - 1)
                minimum = np.float64(off[j]) + bias * np.float64(s[j])
                want = np.float16(np.float64(code) * np.float64(s[j]) + minimum)
                got = (regs[f"${2 * k + j // 2}"] >> (16 * (j % 2))) & 0xFFFF
                assert _bits(want) == got, (bits, k, j, code)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    args, kwargs = _case(5)
    q, keys, values, k_res, v_res = args
    with pytest.raises(ValueError, match=r"keys.bits must be one of \(2, 4, 8\), got 3"):
        quant_decode_attention(q, keys._replace(bits=3), values, k_res, v_res, **kwargs)
    with pytest.raises(ValueError, match="k_quantized 40 must be a multiple of the key group 16"):
        quant_decode_attention(*args, **{**kwargs, "k_quantized": 40})
    with pytest.raises(ValueError, match=r"kv_len 200 must be in \[k_quantized"):
        quant_decode_attention(*args, **{**kwargs, "kv_len": 200})
    with pytest.raises(ValueError, match=r"mask must have shape \[B, kv_len\]"):
        quant_decode_attention(*args, **{**kwargs, "mask": torch.ones(1, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"k_res must be a \[1, 2, R, 32\] tensor"):
        quant_decode_attention(q, keys, values, k_res[..., :16], v_res, **kwargs)
    with pytest.raises(ValueError, match="must be a multiple of the KV heads"):
        quant_decode_attention(q[:, :3], keys, values, k_res, v_res, **kwargs)
    # a word of 2-bit codes holds 16 channels: a value group of 8 would split it
    v2 = quantize_reference(torch.randn(1, 2, 48, 32), "values", 2, 8)
    with pytest.raises(ValueError, match="value group 8 is below 16"):
        quant_decode_attention(q, keys, v2, k_res, v_res, **kwargs)
    assert "value group 8" in supports(q, keys, v2, k_res, v_res)
    # GEAR terms
    gargs, gkw = _case(6, gear=True, nqk=64, nqv=64, kv_len=70)
    bad_block = gkw["k_gear"]._replace(lr_block=24)
    with pytest.raises(ValueError, match="k_gear.lr_block must be a positive multiple of 16, got 24"):
        quant_decode_attention(*gargs, **{**gkw, "k_gear": bad_block})
    short = gkw["v_gear"]._replace(lr_seg=gkw["v_gear"].lr_seg[..., :1])
    with pytest.raises(ValueError, match=r"v_gear.lr_seg must be an int \[B\|1, Hkv\|1, >= 2\]"):
        quant_decode_attention(*gargs, **{**gkw, "v_gear": short})
    wrong_seg = gkw["k_gear"]._replace(lr_seg=gkw["k_gear"].lr_seg + 5)
    with pytest.raises(ValueError, match="lr_seg entries must index the 2 segments"):
        quant_decode_attention(*gargs, **{**gkw, "k_gear": wrong_seg})


# --------------------------------------------------------------------------------------
# GPU: compiled kernels at realistic sizes (bf16 model, float16 dequantization)
# --------------------------------------------------------------------------------------

compiled = pytest.mark.skipif(triton_interpreting(), reason="triton was imported under TRITON_INTERPRET=1; run the "
                              "GPU tests in their own process: pytest -m gpu tests/test_quant_decode_kernel.py")


@pytest.fixture
def fixed_config(monkeypatch):
    monkeypatch.setenv("KVFX_DECODE_AUTOTUNE", "0")  # one compile per case, not ten


def _gpu_case(seed, bits, group, dtype=torch.bfloat16, gear=False, T=4096, B=2, G=4, mask_kind="bool"):
    """A cache as KIVI keeps it after a T-token prompt: keys quantized to T - T mod 128, values to T - 128.
    GEAR: 4% outliers (1 per key row of 64 tokens, 2 per value token at each end)."""
    res = 128
    nqk, nqv = T - T % res, T - res
    return _case(seed, B=B, Hkv=8, G=G, D=128, Dv=128, kbits=bits, vbits=bits, kgroup=group, vgroup=group,
                 nqk=nqk, nqv=nqv, kv_len=T, dtype=dtype, mask_kind=mask_kind, gear=gear, lr_block=128,
                 outliers=0.04, device="cuda")


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("planes", ["0", "1"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.usefixtures("fixed_config")
def test_gpu_kernel_equals_reference(bits, group, planes, monkeypatch):
    monkeypatch.setenv("KVFX_QUANT_PLANES", planes)
    args, kwargs = _gpu_case(bits * group, bits, group, T=4096 + 77)
    _check(quant_decode_attention(*args, **kwargs), _reference(args, kwargs), torch.bfloat16,
           f"{bits}-bit g{group} planes={planes}")


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("asm", ["1", "0"])
@pytest.mark.parametrize("planes", ["0", "1"])
@pytest.mark.usefixtures("fixed_config")
def test_gpu_dtypes_and_plain_dequantization(dtype, asm, planes, monkeypatch):
    """float16 q (PTX path), float32 q (float32 dots), and KVFX_QUANT_ASM=0 (float32 dequantization on CUDA)."""
    monkeypatch.setenv("KVFX_QUANT_ASM", asm)
    monkeypatch.setenv("KVFX_QUANT_PLANES", planes)
    args, kwargs = _gpu_case(7, 4, 64, dtype=dtype, T=3000, mask_kind="float")
    _check(quant_decode_attention(*args, **kwargs), _reference(args, kwargs), dtype,
           f"{dtype} asm={asm} planes={planes}")


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.usefixtures("fixed_config")
def test_gpu_gear_equals_reference(bits):
    args, kwargs = _gpu_case(9, bits, 64, gear=True, T=2048 + 50)
    _check(quant_decode_attention(*args, **kwargs), _reference(args, kwargs), torch.bfloat16, f"gear {bits}-bit")


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("planes", ["0", "1"])
def test_gpu_autotuned_and_quantize_kernel_path(planes, monkeypatch):
    """The autotuned launch (the default) on a cache quantized by the Triton quantizer."""
    monkeypatch.setenv("KVFX_QUANT_PLANES", planes)
    gen = torch.Generator().manual_seed(3)
    T, nq = 8192 + 64, 8192
    xk = torch.randn(2, 8, T, 128, generator=gen).to(torch.bfloat16).cuda()
    xv = torch.randn(2, 8, T, 128, generator=gen).to(torch.bfloat16).cuda()
    q = torch.randn(2, 32, 128, generator=gen).to(torch.bfloat16).cuda()
    keys = quantize(xk[:, :, :nq], "keys", 4, 32)
    values = quantize(xv[:, :, :nq], "values", 2, 32)
    kw = dict(k_quantized=nq, v_quantized=nq, kv_len=T)
    out = quant_decode_attention(q, keys, values, xk[:, :, nq:], xv[:, :, nq:], **kw)
    ref = quant_decode_attention_reference(q.float(), keys, values, xk[:, :, nq:].float(), xv[:, :, nq:].float(),
                                           **kw)
    _check(out, ref, torch.bfloat16, "autotuned")
    assert math.isfinite(float(out.float().sum()))
