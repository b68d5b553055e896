"""Decode attention over a KIVI/GEAR-quantized KV cache, dequantized in registers, and its float32 torch reference.

One query token per sequence attends to ``kv_len`` tokens: the first ``k_quantized`` keys (``v_quantized`` values)
as packed codes, the rest from full-precision residual buffers (the most recent tokens, not yet quantized; KIVI
quantizes keys and values at different points, so the two counts may differ)::

    q: [B, Hq, D]
    keys: Quantized  (kvfx.kernels.quant_pack layout: codes [B, Hkv, Tk, D // per], scale/offset [B, Hkv, Tk // g, D])
    values: Quantized (codes [B, Hkv, Tv, Dv // per], scale/offset [B, Hkv, Tv, Dv // g])
    k_res: [B, Hkv, Rk, D]   token t >= k_quantized is k_res[:, :, t - k_quantized]   (Rk >= kv_len - k_quantized)
    v_res: [B, Hkv, Rv, Dv]  token t >= v_quantized is v_res[:, :, t - v_quantized]
    k_gear, v_gear: GearTerms or None (kvfx.kernels.gear: low-rank A B^T per segment, outliers)
    out[b, h] = softmax(mask(softcap(scale * q[b, h] . K^[b, h // G]))) @ V^[b, h // G]

where ``K^``/``V^`` is :func:`kvfx.kernels.gear.gear_reconstruct` of the quantized part followed by the residual
tokens; ``mask``: None or ``[B, kv_len]`` bool (True = attend) or float additive bias, as
:func:`kvfx.kernels.decode_attention.decode_attention`.  :func:`quant_decode_attention_reference` computes exactly
that in float32 (dequantize, then attend).  Tensors in, tensors out: nothing here knows about caches or models.

Kernel design (:func:`quant_decode_attention`)
----------------------------------------------
* Split-K as kvfx.kernels.decode_attention: grid ``(B * Hkv * num_splits,)``, one program per (row, KV head, split)
  holds the G query heads of its group as one ``[BLOCK_G, D]`` block (padded to 16 rows for ``tl.dot``) and streams
  its chunk of tokens in tiles of ``BLOCK_N`` with an exp2 online softmax; the partial outputs are merged by
  decode_attention's combine kernel.  No full-precision copy of the cache is ever written: each tile is read as
  packed codes (one contiguous block of ``BLOCK_N`` rows) and dequantized in registers.
* The codes are read as int16 lanes, ``P = 16 // bits`` codes each; plane k of a lane holds its code k, and the two
  lanes of a 32-bit word hold adjacent channels at the same offset (kvfx.kernels.quant_pack's layout).  CUDA
  (float16/bfloat16 q): a few PTX instructions per plane turn a word into the float16 pair ``code * scale + min``
  of two adjacent channels (rotate, mask + OR a float16 exponent, fma with the stored offset ``min - 2**bits *
  scale``: 1.5 instructions per code; 8 bits also subtract 1024: 2; no integer-to-float conversion, which runs at
  an eighth of the FMA rate), and both dots run in float16 (q and the softmax weights are cast to float16, as
  exact as bfloat16 or better in their range).  A join tree
  over the P planes and one permute give the ``[BLOCK_N, D]`` tile in channel order, all in registers.  Keys'
  per-channel parameters (one row per key group in the tile) are split into the planes the same way; values'
  per-(token, group) parameters are broadcast over each group's lanes.  Elsewhere (interpreter, float32 q, or
  ``KVFX_QUANT_ASM=0``) the planes are dequantized in float32 with plain shifts and masks.
* Two phases per program (one loop each, the same body unrolled twice at compile time): tiles below
  ``n_bulk = min(k_quantized, v_quantized)`` rounded down to ``BLOCK_N`` read codes only; the tail (at most a few
  hundred tokens, in the last split) reads each token's key and value from codes or the residual buffer.
* GEAR: the low-rank key term enters the logits as ``(q B_seg) A_tile^T`` (``q B`` one ``[BLOCK_G, D] x [D, 16]``
  tensor-core product per tile, the rank padded to 16), the value term as ``(p A_tile) B_seg^T`` added to the
  accumulator.  Outliers replace entries of the dequantized tile before the dot (``where(position == index,
  value, x)`` per stored outlier slot): keys per (token group, slot) row of ``D`` token offsets, values per token.
* CUDA: the split kernel is autotuned over (BLOCK_N, num_warps, num_stages) like decode_attention's (same
  ``KVFX_DECODE_AUTOTUNE`` switch; BLOCK_N divides GEAR's low-rank block); CPU tensors run the same kernels under
  the Triton interpreter (dot operands in float32, bf16 outputs rounded by torch: see
  kvfx.kernels.decode_attention).  Device helpers are shared by both variants through
  ``kvfx.kernels.device_function.DeviceFunction``.

Plane-order kernel (:func:`_quant_plane_kernel`; ``KVFX_QUANT_PLANES=1``, KIVI caches: GEAR runs the split kernel)
----------------------------------------------------------------------------------------------------------------
Why: the split kernel above is bound by instructions and latency, not bandwidth (H100, B=8, T=32768, Hq=32,
Hkv=8, d=128: kivi-4 g32 0.388 ms, 0.87 TB/s effective, against SDPA's 0.364 ms over the bf16 cache).  Its sm_90
SASS (Triton 3.6, 128-token tiles, 4 warps, offline) runs ~40 warp instructions per token in the bulk loop, a
third of them moving data between layouts (the join tree and permute to channel order, the key parameters split
into planes), and needs 254 registers and 125 KB of shared memory: one 4-warp program per SM, nothing to hide
latency with.  The plane-order kernel never puts a tile in channel order:

* Plane k of int16 lane l is channel ``ch(l, k) = (l // 2) * 2P + 2k + l % 2``.  q, the key scales and offsets,
  the residual rows and the outputs are read and written in plane order through permuted pointers (gathers are
  cheap; register permutes are not), so every tile is worked on as P planes ``[tokens, lanes]``.
* Keys: the per-channel scale is folded into the query.  A plane's codes become the float16 ``C_k + code``
  exactly with one lop3 (mask + OR an exponent) after a rotation shared by the planes that need it
  (:func:`_key_plane_consts`: 0.75 instructions per code at 4 bits, 0.625 at 2, no fma), and the logits are
  ``S + bias`` with ``S = sum_k (q_k s_k) . (C_k + code_k)^T`` and ``bias = sum_c q (min + MID s) - sum_k (C_k +
  MID) (q_k s_k)`` (MID = 2**(bits - 1), the middle code), both on tensor cores (the bias as the diagonal of
  ``X = sum_k q_k . (min + MID s)_k^T - (q_k s_k) . (C_k + MID)``).  Precision: ``q s`` and ``min + MID s`` are
  float16 (one rounding each, as a float16 dequantized tile has), products exact, sums in float32; ``C_k + MID``
  is exact in float16 (C_k = 16 or 256 at 4 bits) and cancels exactly against the rounded ``q s``, whose rounding
  then only meets ``code - MID`` (emulated in torch at d = 128, T = 1101: errors against the float32 reference as
  the split kernel's, 1.0e-3 at worst for float16 q against the tests' 2e-3).
* A tile of BLOCK_N tokens spans ``KGR = BLOCK_N / K_GROUP`` key groups, each with its own scales: the query
  rows are stacked, row ``r * G' + g`` (G' = G rounded up to a power of two) holding head g with key group r's
  scales; a token counts only in the rows of its group, every row keeps its own online-softmax state, and the
  rows of a head are merged at the end as split-K partials are.  At G = 4 and g32, the 16 stacked rows of a
  128-token tile are the 16 tensor-core rows that were padding.  In the bulk loop (no softcap) the bias, a
  constant along each row, goes into the row maximum instead of into every logit.
* Values: per plane the split kernel's PTX (rotate, mask + exponent, fma with the (token, group) scale and
  offset), ``acc_k += p . V_k`` into P accumulators ``[rows, lanes]`` (the registers of one ``[rows, Dv]``).
  The (token, group) parameters are loaded once and broadcast over the group's lanes, which lets the compiler
  dequantize straight into the tensor-core operand layout (codes read from shared memory with ldmatrix; no
  shared-memory round trip for the dequantized tile).  With fewer int16 lanes than VALUE_N (8 per warp; 2 bits at
  d = 128: 16) the value codes are read as bytes (32 lanes of 4 codes, :func:`_asm_dequant_bytes`): Triton gives
  every dot of a loop the warp layout it picked for the last one, and a square [16, 16] value dot gets its warps
  along M, i.e. every warp would repeat the whole tile.
* The tail (partial tiles, residual tokens) runs in the same plane order in 16-token tiles, unpipelined, before
  the bulk loop (its loop invariants are dead by then: a kernel's register count is its larger loop's).  Bulk
  tiles are full: no masks; per tile one int64 scalar per tensor plus int32 loop-invariant offsets.
* 4 warps (the rows are one 16-row tensor-core tile: more warps only split the tokens and repeat the query
  operands); autotuned over 128/64-token tiles, 2-3 stages and register caps of 168 / 128 (3 / 4 programs per
  SM).  Offline SASS of the bulk loop (Triton 3.6, d = 128, G = 4, 128-token tiles, 168 registers, no spills,
  33 KB shared memory): ~27 warp instructions per token at 4 bits g32, ~34 at 2 bits g64 (the byte lanes' shared
  memory reads cost ~7).  Measured on the H100 (B=8, T=32768, 32/8 heads, d=128, bf16;
  ``benchmarks/results/decode_quant_planes_h100.txt``), SDPA-GQA 0.365 ms: kivi-4 g32 0.250 ms (1.46x; the
  channel-order kernel 0.388 ms), g64 0.241 ms (1.51x; 0.411), kivi-2 g32 0.259 ms (1.41x; 0.372), g64 0.254 ms
  (1.44x; 0.310).  Still short of 3x / 5x: at 0.7-1.35 TB/s effective the kernel remains instruction-bound.
* The interpreter runs the same kernel with float32 planes (codes as integers, C_k = 0) and float32 dots.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from kvfx.kernels import decode_attention as _da
from kvfx.kernels.device_function import DeviceFunction
from kvfx.kernels.gear import MAX_RANK, GearTerms, gear_reconstruct
from kvfx.kernels.quant_pack import BITS, Quantized

__all__ = ["quant_decode_attention", "quant_decode_attention_reference", "supports", "kv_bytes",
           "default_num_splits"]

_MAX = _da._MAX  # tl.reduce combine functions (see kvfx.kernels.decode_attention)
_SUM = _da._SUM
_RANK_PAD = 16  # the low-rank factors are one 16-wide tl.dot operand


def _asm_enabled() -> bool:
    """KVFX_QUANT_ASM=0 turns the PTX dequantization off (CUDA then dequantizes in float32, tiles in q's dtype)."""
    return os.environ.get("KVFX_QUANT_ASM", "1").strip().lower() not in ("0", "false", "no", "off")


def _planes_enabled() -> bool:
    """KVFX_QUANT_PLANES=0 selects the channel-order split kernel for KIVI caches too; by default the plane-order
    kernel runs them where it applies (:func:`_use_planes`): on the H100 it is 1.2-1.6x faster (module docstring)."""
    return os.environ.get("KVFX_QUANT_PLANES", "1").strip().lower() not in ("0", "false", "no", "off")


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------


def _full_cache(qt: Quantized, gear: GearTerms | None, res: Tensor, n_quant: int, kv_len: int) -> Tensor:
    """float32 [B, Hkv, kv_len, C]: the reconstructed quantized tokens, then the residual ones."""
    return torch.cat([gear_reconstruct(qt, gear, n_quant), res[:, :, : kv_len - n_quant].float()], dim=2)


def quant_decode_attention_reference(
    q: Tensor, keys: Quantized, values: Quantized, k_res: Tensor, v_res: Tensor, *,
    k_quantized: int, v_quantized: int, kv_len: int, mask: Tensor | None = None, scale: float | None = None,
    softcap: float = 0.0, k_gear: GearTerms | None = None, v_gear: GearTerms | None = None,
) -> Tensor:  # [B, Hq, Dv] in q.dtype
    """Dequantize (+ GEAR terms), then plain float32 attention.  Same contract as :func:`quant_decode_attention`;
    a row with every token masked gives zeros."""
    _check_inputs(q, keys, values, k_res, v_res, k_quantized, v_quantized, kv_len, mask, scale, softcap, None,
                  k_gear, v_gear)
    B, Hq, D = q.shape
    Hkv = keys.codes.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k = _full_cache(keys, k_gear, k_res, k_quantized, kv_len)  # [B, Hkv, kv_len, D]
    v = _full_cache(values, v_gear, v_res, v_quantized, kv_len)
    s = torch.einsum("bhgd,bhnd->bhgn", q.float().reshape(B, Hkv, G, D), k) * scale
    if softcap and softcap > 0:
        s = float(softcap) * torch.tanh(s / float(softcap))
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        else:
            s = s + mask.float()[:, None, None, :]
    m = s.amax(dim=-1, keepdim=True) if kv_len > 0 else s.new_zeros(B, Hkv, G, 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhgn,bhnd->bhgd", p, v) / torch.where(l == 0, torch.ones_like(l), l)
    return out.reshape(B, Hq, v.shape[-1]).to(q.dtype)


# --------------------------------------------------------------------------------------
# Triton kernel.  House rules of kvfx.kernels.decode_attention: a plain function wrapped as compiled and
# interpreted variants, no triton.language.standard @jit helpers in the body, constexpr trip counts under the
# interpreter.
# --------------------------------------------------------------------------------------


def _asm_dequant(bits: int) -> str:
    """PTX dequantizing two codes (adjacent channels, one per 16-bit half of ``$1``) into the two float16 halves of
    ``$0``; ``$2``/``$3`` the two scales / stored offsets (kvfx.kernels.quant_pack), ``$4`` the plane's rotation
    (:func:`_plane_rotation`).  Each half is independent; no integer-to-float conversion.

    2 and 4 bits, three instructions per two codes: rotate the plane's code to mantissa bits [10 - bits, 10), mask
    it and OR in the exponent of 2**bits (the float16 ``2**bits + code``, exactly), one fma with the scale and the
    offset ``min - 2**bits * scale``: ``code * scale + min`` rounded once.  8 bits (offset = min), four: the code
    to bits [0, 8) under the exponent of 1024, an exact subtraction of 1024, the fma."""
    m = (1 << bits) - 1
    if bits < 8:
        mask = (m << (10 - bits)) * 0x10001
        magic = ((bits + 15) << 10) * 0x10001
        return (f"{{ .reg .b32 t; shf.l.wrap.b32 t, $1, $1, $4; lop3.b32 t, t, {mask:#010x}, {magic:#010x}, 0xea; "
                "fma.rn.f16x2 $0, t, $2, $3; }")
    return ("{ .reg .b32 t, k; shf.l.wrap.b32 t, $1, $1, $4; mov.b32 k, 0x64006400; "
            f"lop3.b32 t, t, {m * 0x10001:#010x}, k, 0xea; sub.f16x2 t, t, k; fma.rn.f16x2 $0, t, $2, $3; }}")


def _plane_rotation(bits: int, k: int) -> int:
    """Left rotation that brings plane k's code (bits [k * bits, (k + 1) * bits) of each half) to where
    _asm_dequant wants it (the same formula is inlined in _dequant_plane)."""
    return (10 - bits - k * bits) % 32 if bits < 8 else (32 - k * bits) % 32


def _asm_dequant_bytes(bits: int) -> str:
    """PTX dequantizing the codes of four value bytes (``$n``, n = 2 * planes: 4 int8 lanes with pack=4; a byte holds
    ``planes = 8 // bits`` codes, code k in bits [k * bits, (k + 1) * bits)) into float16 pairs: plane k of bytes
    0, 1 in ``$(2k)``, of bytes 2, 3 in ``$(2k + 1)``; ``$(n + 1)``/``$(n + 2)`` the scales and ``$(n + 3)``/
    ``$(n + 4)`` the stored offsets of those pairs.  Two ``prmt`` put bytes 0, 1 (2, 3) in the high bytes of the two
    16-bit halves (once for every plane), then per pair of codes: shift (_byte_plane_shift; none for 2-bit plane 0),
    mask + OR the exponent of 2**bits, fma as :func:`_asm_dequant`: 1.5 instructions per code and 0.5 per byte.
    2 and 4 bits."""
    assert bits < 8
    planes = 8 // bits
    n = 2 * planes
    m = (1 << bits) - 1
    mask = (m << (10 - bits)) * 0x10001
    magic = ((bits + 15) << 10) * 0x10001
    asm = [f"{{ .reg .b32 z, lo, hi, t, u; mov.b32 z, 0; prmt.b32 lo, ${n}, z, 0x1404; prmt.b32 hi, ${n}, z, 0x3424;"]
    for k in range(planes):
        shift = _byte_plane_shift(bits, k)
        src_lo, src_hi = "lo", "hi"
        if shift:
            asm.append(f"shr.b32 t, lo, {shift}; shr.b32 u, hi, {shift};")
            src_lo, src_hi = "t", "u"
        asm.append(f"lop3.b32 t, {src_lo}, {mask:#010x}, {magic:#010x}, 0xea; "
                   f"lop3.b32 u, {src_hi}, {mask:#010x}, {magic:#010x}, 0xea; "
                   f"fma.rn.f16x2 ${2 * k}, t, ${n + 1}, ${n + 3}; fma.rn.f16x2 ${2 * k + 1}, u, ${n + 2}, ${n + 4};")
    return " ".join(asm) + " }"


def _byte_plane_shift(bits: int, k: int) -> int:
    """Right shift that brings code k of a byte, once the byte sits in the high byte of a 16-bit half (bits
    [8 + k * bits, 8 + (k + 1) * bits)), to mantissa bits [10 - bits, 10) (the same formula is inlined in
    _dequant_bytes)."""
    return k * bits + bits - 2


def _dequant_plane(h, s, m, K: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr, ASM: tl.constexpr,
                   R: tl.constexpr, E: tl.constexpr, RPP: tl.constexpr):
    """Plane ``K`` (the codes in bits [K * BITS, (K + 1) * BITS) of every 16-bit lane) of ``h [R, E]``:
    code * s + m, float16 through PTX if FAST, else float32.  ``s``, ``m``: [R // RPP, E], one parameter row per
    RPP rows of h, as _dequant_params returns them."""
    if RPP > 1:
        s = tl.reshape(tl.broadcast_to(s[:, None, :], [R // RPP, RPP, E]), [R, E])
        m = tl.reshape(tl.broadcast_to(m[:, None, :], [R // RPP, RPP, E]), [R, E])
    if FAST:
        rot: tl.constexpr = (10 - BITS - K * BITS) % 32 if BITS < 8 else (32 - K * BITS) % 32  # _plane_rotation
        out = tl.inline_asm_elementwise(ASM, "=r,r,r,r,r,r", [h, s, m, tl.full([R, E], rot, tl.int32)],
                                        dtype=tl.float16, is_pure=True, pack=2)
    else:
        code = ((h.to(tl.int32) >> (K * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        out = code * s.to(tl.float32) + m.to(tl.float32)
    return out


def _dequant_params(s, m, BITS: tl.constexpr, FAST: tl.constexpr):
    """Scales and stored offsets as the plane dequantization takes them: float16 for the PTX (FAST, which applies
    the offset bias itself), else float32 scales and minimums ``offset + offset_bias(BITS) * scale``."""
    if FAST:
        s = s.to(tl.float16)
        m = m.to(tl.float16)
    else:
        s = s.to(tl.float32)
        m = m.to(tl.float32)
        if BITS < 8:
            m = m + (1 << BITS) * s
    return s, m


def _key_planes(s, R: tl.constexpr, E: tl.constexpr, P: tl.constexpr):
    """Per-channel parameters [R, E * P] (channel j * 2P + 2k + h) -> (plane 0, ..., plane P - 1), each [R, E]
    (lane 2j + h), the entries past P repeating plane 0.  The pair h stays the fastest register index throughout
    (a lane pair is two adjacent channels, one 32-bit register of a float16 load)."""
    W: tl.constexpr = E // 2
    if P == 2:
        x = tl.permute(tl.reshape(s, [R, W, 2, 2]), (0, 1, 3, 2))  # [R, W, h, k]
        p0, p1 = tl.split(x)
        p2, p3, p4, p5, p6, p7 = p0, p0, p0, p0, p0, p0
    elif P == 4:  # k = 2a + b
        x = tl.permute(tl.reshape(s, [R, W, 2, 2, 2]), (0, 1, 4, 2, 3))  # [R, W, h, a, b]
        b0, b1 = tl.split(x)
        p0, p2 = tl.split(b0)
        p1, p3 = tl.split(b1)
        p4, p5, p6, p7 = p0, p0, p0, p0
    else:  # P == 8: k = 4a + 2b + c
        x = tl.permute(tl.reshape(s, [R, W, 2, 2, 2, 2]), (0, 1, 5, 2, 3, 4))  # [R, W, h, a, b, c]
        c0, c1 = tl.split(x)
        b00, b01 = tl.split(c0)  # b00: b = 0, c = 0
        b10, b11 = tl.split(c1)
        p0, p4 = tl.split(b00)
        p2, p6 = tl.split(b01)
        p1, p5 = tl.split(b10)
        p3, p7 = tl.split(b11)
    return (tl.reshape(p0, [R, E]), tl.reshape(p1, [R, E]), tl.reshape(p2, [R, E]), tl.reshape(p3, [R, E]),
            tl.reshape(p4, [R, E]), tl.reshape(p5, [R, E]), tl.reshape(p6, [R, E]), tl.reshape(p7, [R, E]))


def _dequant_tile(h, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7,
                  R: tl.constexpr, E: tl.constexpr, RPP: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr,
                  ASM: tl.constexpr):
    """int16 code lanes h [R, E] (P = 16 // BITS codes each) and per-plane parameters (s_k, m_k: [R // RPP, E],
    from _dequant_params) -> the dequantized tile [R, E * P] in channel order: a join tree over the planes (its
    leaves pair planes k and k + P / 2), then lane pairs (2j, 2j + 1) interleaved with the planes (channel
    j * 2P + 2k + h)."""
    P: tl.constexpr = 16 // BITS
    p0 = _DEQUANT_PLANE(h, s0, m0, 0, BITS, FAST, ASM, R, E, RPP)
    p1 = _DEQUANT_PLANE(h, s1, m1, 1, BITS, FAST, ASM, R, E, RPP)
    if P == 2:
        x = tl.join(p0, p1)
    else:
        p2 = _DEQUANT_PLANE(h, s2, m2, 2, BITS, FAST, ASM, R, E, RPP)
        p3 = _DEQUANT_PLANE(h, s3, m3, 3, BITS, FAST, ASM, R, E, RPP)
        if P == 4:
            x = tl.join(tl.join(p0, p2), tl.join(p1, p3))
        else:
            p4 = _DEQUANT_PLANE(h, s4, m4, 4, BITS, FAST, ASM, R, E, RPP)
            p5 = _DEQUANT_PLANE(h, s5, m5, 5, BITS, FAST, ASM, R, E, RPP)
            p6 = _DEQUANT_PLANE(h, s6, m6, 6, BITS, FAST, ASM, R, E, RPP)
            p7 = _DEQUANT_PLANE(h, s7, m7, 7, BITS, FAST, ASM, R, E, RPP)
            x = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    # [R, E, P...] with the plane index k flattened last -> [R, E // 2, 2 (h), P] -> [R, E // 2, P, 2]
    return tl.reshape(tl.permute(tl.reshape(x, [R, E // 2, 2, P]), (0, 1, 3, 2)), [R, E * P])


_DEQUANT_PLANE = DeviceFunction(_dequant_plane)
_DEQUANT_PARAMS = DeviceFunction(_dequant_params)
_KEY_PLANES = DeviceFunction(_key_planes)
_DEQUANT_TILE = DeviceFunction(_dequant_tile)


def _quant_split_kernel(
    Q, KC, KS, KM, VC, VS, VM, KR, VR, M, O, Opart, Lse,
    KA, KB, KSEG, KOI, KOV,
    VA, VB, VSEG, VOI, VOV,
    stride_qb, stride_qh,
    stride_kcb, stride_kch, stride_kcn,
    stride_ksb, stride_ksh, stride_ksg,
    stride_vcb, stride_vch, stride_vcn,
    stride_vsb, stride_vsh, stride_vsn,
    stride_krb, stride_krh, stride_krn,
    stride_vrb, stride_vrh, stride_vrn,
    stride_mb, stride_mn,
    stride_ob, stride_oh,
    stride_kab, stride_kah, stride_kan,
    stride_kbb, stride_kbh, stride_kbs, stride_kbd,
    stride_ksegb, stride_ksegh, stride_ksegn,
    stride_koib, stride_koih, stride_koig, stride_koij,
    stride_vab, stride_vah, stride_van,
    stride_vbb, stride_vbh, stride_vbs, stride_vbd,
    stride_vsegb, stride_vsegh, stride_vsegn,
    stride_voib, stride_voih, stride_voin,
    n_qk, n_qv, kv_len, num_splits, Hkv, lr_block, rank_k, rank_v,
    sm_scale, softcap,
    TUNE_KEY,  # unused by the body: only part of the autotuning key
    QGROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    FAST: tl.constexpr,  # dequantize through PTX into float16 tiles (CUDA); else float32 tiles
    K_ASM: tl.constexpr,  # the PTX of _asm_dequant(K_BITS) / (V_BITS)
    V_ASM: tl.constexpr,
    K_GROUP: tl.constexpr,  # tokens per key group
    V_GROUP: tl.constexpr,  # channels per value group
    MASK_KIND: tl.constexpr,  # 0: none, 1: bool (nonzero = attend), 2: additive float bias
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 and use IEEE fp32 products
    DIRECT_OUT: tl.constexpr,  # num_splits == 1: write the final output in O's dtype
    K_LOWRANK: tl.constexpr,
    V_LOWRANK: tl.constexpr,
    K_OUTLIERS: tl.constexpr,  # outlier slots per key (token group, channel) row; 0 = none
    V_OUTLIERS: tl.constexpr,  # outlier slots per value token; 0 = none
    RANK_PAD: tl.constexpr,
    LR_ALIGN: tl.constexpr,  # unused by the body: the autotuner's pruning reads it
    STATIC: tl.constexpr,  # interpreter: constexpr trip counts STATIC_BULK / STATIC_TAIL (masked overshoot)
    STATIC_BULK: tl.constexpr,
    STATIC_TAIL: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    KP: tl.constexpr = 16 // K_BITS  # codes per 16-bit lane
    VP: tl.constexpr = 16 // V_BITS
    KE: tl.constexpr = HEAD_DIM // KP  # int16 lanes per key row
    VE: tl.constexpr = HEAD_DV // VP
    VNG: tl.constexpr = HEAD_DV // V_GROUP  # value groups per token
    KGR: tl.constexpr = BLOCK_N // K_GROUP if BLOCK_N > K_GROUP else 1  # key groups per tile
    KGT: tl.constexpr = K_GROUP if BLOCK_N > K_GROUP else BLOCK_N  # tokens of a tile per key group
    pid = tl.program_id(0)
    split = pid % num_splits
    bh = pid // num_splits
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DV)
    offs_n = tl.arange(0, BLOCK_N)
    offs_ke = tl.arange(0, KE)
    offs_ve = tl.arange(0, VE)
    offs_vg = tl.arange(0, VNG)
    offs_kgr = tl.arange(0, KGR)
    offs_r = tl.arange(0, RANK_PAD)
    g_valid = offs_g < QGROUP
    hq = hk * QGROUP + offs_g  # query heads of this group (int64)

    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + offs_d[None, :], mask=g_valid[:, None], other=0.0)
    if not HAS_SOFTCAP:  # fold the scale and log2(e) into q once: the logits come out in log2 units
        q = q.to(tl.float32) * (sm_scale * LOG2E)
    if DOT_FP32:
        q = q.to(tl.float32)
    elif FAST:
        q = q.to(tl.float16)  # the dequantized tiles are float16
    else:
        q = q.to(Q.dtype.element_ty)

    per_split = (kv_len + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)
    n_bulk = tl.minimum(n_qk, n_qv) // BLOCK_N * BLOCK_N

    kc_base = KC + b * stride_kcb + hk * stride_kch
    ks_base = KS + b * stride_ksb + hk * stride_ksh  # KM shares KS's strides
    km_base = KM + b * stride_ksb + hk * stride_ksh
    vc_base = VC + b * stride_vcb + hk * stride_vch
    vs_base = VS + b * stride_vsb + hk * stride_vsh  # VM shares VS's strides
    vm_base = VM + b * stride_vsb + hk * stride_vsh
    kr_base = KR + b * stride_krb + hk * stride_krh
    vr_base = VR + b * stride_vrb + hk * stride_vrh
    m_base = M + b * stride_mb
    ka_base = KA + b * stride_kab + hk * stride_kah
    kb_base = KB + b * stride_kbb + hk * stride_kbh
    kseg_base = KSEG + b * stride_ksegb + hk * stride_ksegh
    koi_base = KOI + b * stride_koib + hk * stride_koih  # KOV shares KOI's (element) strides
    kov_base = KOV + b * stride_koib + hk * stride_koih
    va_base = VA + b * stride_vab + hk * stride_vah
    vb_base = VB + b * stride_vbb + hk * stride_vbh
    vseg_base = VSEG + b * stride_vsegb + hk * stride_vsegh
    voi_base = VOI + b * stride_voib + hk * stride_voih  # VOV shares VOI's (element) strides
    vov_base = VOV + b * stride_voib + hk * stride_voih

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, HEAD_DV], 0.0, tl.float32)

    # phase 0: tiles below n_bulk (a multiple of BLOCK_N), keys and values both quantized; phase 1: the rest, each
    # token from codes or the residual buffer.  Compiled: runtime trip counts.  Interpreter: constexpr counts (the
    # blocks past `hi` are fully masked and change nothing; see decode_attention for why).
    for phase in tl.static_range(2):
        if phase == 0:
            lo = start
            hi = tl.minimum(end, n_bulk)
        else:
            lo = tl.maximum(start, n_bulk)
            hi = end
        for it in range(0, (STATIC_BULK if phase == 0 else STATIC_TAIL) if STATIC else
                        (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N):
            t0 = lo + it * BLOCK_N  # the tile's first token: a multiple of BLOCK_N
            cols = (t0 + offs_n).to(tl.int64)
            n_valid = cols < hi
            if phase == 0:
                kq_valid = n_valid
                vq_valid = n_valid
            else:
                kq_valid = n_valid & (cols < n_qk)
                vq_valid = n_valid & (cols < n_qv)

            # ---- keys: [BLOCK_N, D // P] int16 lanes of P codes -> code * scale + min, [BLOCK_N, D] ----
            kh = tl.load(kc_base + cols[:, None] * stride_kcn + offs_ke[None, :], mask=kq_valid[:, None], other=0)
            # parameters: the tile covers KGR key groups (or lies in one) of KGT of its tokens each
            if phase == 0:
                k_bound = hi
            else:
                k_bound = tl.minimum(hi, n_qk)
            kg = t0 // K_GROUP + offs_kgr  # [KGR] parameter rows
            kg_valid = (t0 + offs_kgr * KGT) < k_bound
            kp_off = kg[:, None] * stride_ksg + offs_d[None, :]  # [KGR, D]
            ks = tl.load(ks_base + kp_off, mask=kg_valid[:, None], other=0.0)
            km = tl.load(km_base + kp_off, mask=kg_valid[:, None], other=0.0)
            ks, km = _DEQUANT_PARAMS(ks, km, K_BITS, FAST)
            s0, s1, s2, s3, s4, s5, s6, s7 = _KEY_PLANES(ks, KGR, KE, KP)
            z0, z1, z2, z3, z4, z5, z6, z7 = _KEY_PLANES(km, KGR, KE, KP)
            k = _DEQUANT_TILE(kh, s0, s1, s2, s3, s4, s5, s6, s7, z0, z1, z2, z3, z4, z5, z6, z7,
                              BLOCK_N, KE, KGT, K_BITS, FAST, K_ASM)  # [BLOCK_N, D]
            k3 = tl.reshape(k, [KGR, KGT, HEAD_DIM])
            in_group = (t0 % K_GROUP + tl.arange(0, KGT))[None, :, None]  # each token's offset in its group
            for j in tl.static_range(K_OUTLIERS):
                o_off = kg[:, None] * stride_koig + j * stride_koij + offs_d[None, :]
                oi = tl.load(koi_base + o_off, mask=kg_valid[:, None], other=0).to(tl.int32)
                ov = tl.load(kov_base + o_off, mask=kg_valid[:, None], other=0.0).to(k3.dtype)
                k3 = tl.where(in_group == oi[:, None, :], ov[:, None, :], k3)
            k = tl.reshape(k3, [BLOCK_N, HEAD_DIM])
            if phase == 1:
                kr = tl.load(kr_base + (cols - n_qk)[:, None] * stride_krn + offs_d[None, :],
                             mask=(n_valid & (cols >= n_qk))[:, None], other=0.0).to(k.dtype)
                k = tl.where((cols < n_qk)[:, None], k, kr)
            if DOT_FP32:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k.to(q.dtype)))
            if K_LOWRANK:  # + (q B_seg) A_tile^T
                kseg = tl.load(kseg_base + (t0 // lr_block) * stride_ksegn, mask=t0 < n_qk, other=0).to(tl.int64)
                r_k = offs_r < rank_k
                kb = tl.load(kb_base + kseg * stride_kbs + offs_d[:, None] * stride_kbd + offs_r[None, :],
                             mask=r_k[None, :], other=0.0)  # [D, RANK_PAD]
                ka = tl.load(ka_base + cols[:, None] * stride_kan + offs_r[None, :],
                             mask=kq_valid[:, None] & r_k[None, :], other=0.0)  # [BLOCK_N, RANK_PAD]
                if DOT_FP32:
                    qb = tl.dot(q, kb.to(tl.float32), input_precision="ieee")
                    s += tl.dot(qb, tl.trans(ka.to(tl.float32)), input_precision="ieee")
                else:
                    qb = tl.dot(q, kb.to(q.dtype))
                    s += tl.dot(qb.to(q.dtype), tl.trans(ka.to(q.dtype)))
            if HAS_SOFTCAP:
                # s = softcap * tanh(s / softcap) in log2 units; tanh from exp2 (no libdevice), odd Taylor series
                # near 0
                s = s * sm_scale
                x = s / softcap
                ax = tl.abs(x)
                e = tl.exp2(ax * (-2.0 * LOG2E))
                th_big = (1.0 - e) / (1.0 + e)
                x2 = x * x
                th_small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
                th = tl.where(ax < 0.125, th_small, th_big)
                s = (softcap * LOG2E) * tl.where(x < 0, -th, th)
            if MASK_KIND == 1:
                mv = tl.load(m_base + cols * stride_mn, mask=n_valid, other=0)
                s = tl.where((mv != 0)[None, :], s, float("-inf"))
            elif MASK_KIND == 2:
                bias = tl.load(m_base + cols * stride_mn, mask=n_valid, other=0.0).to(tl.float32)
                s = s + bias[None, :] * LOG2E
            s = tl.where(n_valid[None, :], s, float("-inf"))  # the logits, in log2 units

            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
            acc = acc * alpha[:, None]
            m_i = m_new

            # ---- values: [BLOCK_N, Dv // P] int16 lanes -> code * scale + min per (token, group) ----
            vh = tl.load(vc_base + cols[:, None] * stride_vcn + offs_ve[None, :], mask=vq_valid[:, None], other=0)
            vs_off = cols[:, None] * stride_vsn + offs_vg[None, :]
            vs = tl.load(vs_base + vs_off, mask=vq_valid[:, None], other=0.0)  # [BLOCK_N, VNG]
            vm = tl.load(vm_base + vs_off, mask=vq_valid[:, None], other=0.0)
            vs, vm = _DEQUANT_PARAMS(vs, vm, V_BITS, FAST)
            vs = tl.reshape(tl.broadcast_to(vs[:, :, None], [BLOCK_N, VNG, VE // VNG]), [BLOCK_N, VE])  # per lane
            vm = tl.reshape(tl.broadcast_to(vm[:, :, None], [BLOCK_N, VNG, VE // VNG]), [BLOCK_N, VE])
            v = _DEQUANT_TILE(vh, vs, vs, vs, vs, vs, vs, vs, vs, vm, vm, vm, vm, vm, vm, vm, vm,
                              BLOCK_N, VE, 1, V_BITS, FAST, V_ASM)  # [BLOCK_N, Dv]
            for j in tl.static_range(V_OUTLIERS):
                oi = tl.load(voi_base + cols * stride_voin + j, mask=vq_valid, other=0).to(tl.int32)
                ov = tl.load(vov_base + cols * stride_voin + j, mask=vq_valid, other=0.0).to(v.dtype)
                v = tl.where(offs_dv[None, :] == oi[:, None], ov[:, None], v)
            if phase == 1:
                vr = tl.load(vr_base + (cols - n_qv)[:, None] * stride_vrn + offs_dv[None, :],
                             mask=(n_valid & (cols >= n_qv))[:, None], other=0.0).to(v.dtype)
                v = tl.where((cols < n_qv)[:, None], v, vr)
            if DOT_FP32:
                acc += tl.dot(p, v, input_precision="ieee")
            else:
                acc += tl.dot(p.to(q.dtype), v.to(q.dtype))
            if V_LOWRANK:  # + (p A_tile) B_seg^T
                vseg = tl.load(vseg_base + (t0 // lr_block) * stride_vsegn, mask=t0 < n_qv, other=0).to(tl.int64)
                r_v = offs_r < rank_v
                va = tl.load(va_base + cols[:, None] * stride_van + offs_r[None, :],
                             mask=vq_valid[:, None] & r_v[None, :], other=0.0)  # [BLOCK_N, RANK_PAD]
                vb = tl.load(vb_base + vseg * stride_vbs + offs_r[:, None] + offs_dv[None, :] * stride_vbd,
                             mask=r_v[:, None], other=0.0)  # [RANK_PAD, Dv]
                if DOT_FP32:
                    pa = tl.dot(p, va.to(tl.float32), input_precision="ieee")
                    acc += tl.dot(pa, vb.to(tl.float32), input_precision="ieee")
                else:
                    pa = tl.dot(p.to(q.dtype), va.to(q.dtype))
                    acc += tl.dot(pa.to(q.dtype), vb.to(q.dtype))

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # l == 0 only if every token was masked: acc == 0
    out = acc / l_safe[:, None]
    if DIRECT_OUT:
        o_ptrs = O + b * stride_ob + hq[:, None] * stride_oh + offs_dv[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=g_valid[:, None])
    else:
        # Opart: [B, Hq, num_splits, Dv] fp32 contiguous; Lse: [B, Hq, num_splits] fp32 (log2 units)
        row = (b * (Hkv * QGROUP) + hq) * num_splits + split
        tl.store(Opart + row[:, None] * HEAD_DV + offs_dv[None, :], out, mask=g_valid[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(Lse + row, lse, mask=g_valid)


# Runtime ints that vary per call are not specialised (no recompiles as lengths, split counts or ranks change).
_SPLIT_JIT = JITFunction(_quant_split_kernel, do_not_specialize=[
    "n_qk", "n_qv", "kv_len", "num_splits", "Hkv", "lr_block", "rank_k", "rank_v", "TUNE_KEY"])

_INTERPRET_CONFIG = dict(BLOCK_N=32, num_warps=4, num_stages=1)
# Without autotuning: the fewest instructions per code in the sm_90 SASS of the bulk loop (offline counts, d = 128,
# G = 4: about 4 per code at BLOCK_N 128 / 4 warps, 5 at 64).
_FIXED_GPU_CONFIG = dict(BLOCK_N=128, num_warps=4, num_stages=2)


def _autotune_configs():
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in [
        (128, 4, 2), (128, 4, 3), (128, 8, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (32, 4, 3),
    ]]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs whose BLOCK_N divides the low-rank block (GEAR segments never straddle a tile)."""
    align = kwargs["LR_ALIGN"]
    kept = [c for c in configs if align == 0 or align % c.kwargs["BLOCK_N"] == 0]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


_SPLIT_TUNED = triton.autotune(
    configs=_autotune_configs(),
    key=["HEAD_DIM", "HEAD_DV", "QGROUP", "K_BITS", "V_BITS", "K_GROUP", "V_GROUP", "K_LOWRANK", "V_LOWRANK",
         "K_OUTLIERS", "V_OUTLIERS", "MASK_KIND", "TUNE_KEY"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_SPLIT_JIT)


# --------------------------------------------------------------------------------------
# Plane-order kernel (KIVI caches; module docstring, "Plane-order kernel")
# --------------------------------------------------------------------------------------


def _key_plane_consts(bits: int, k: int) -> tuple[int, int, int, int, int]:
    """(shift, a, mask, magic, C) for plane k of the key codes (bits [k * bits, (k + 1) * bits) of each 16-bit
    half): shifting the word left by ``shift`` (right if negative; as a 32-bit rotation) puts the code at mantissa
    bits [a, a + bits) of its half, and ``(word & mask) | magic`` is then, in each half, the float16 ``C + code``
    with ``C = 2**(10 - a)`` exactly (exponent field 25 - a: 2**(10 - a) * (1 + code * 2**(a - 10))).

    Shifts come from a short list per width ({4: +2, -6}, {2: +6, 0, -6}, {8: +2, -6}: at most three distinct
    shifts per word, which ptxas computes once for all planes) and each plane takes the one that puts its code
    highest (smallest C: the dot accumulates ``C * q s`` terms that the bias takes out again, so a small C keeps
    that cancellation cheap in float32): C = 16 or 256 at 4 bits, 4 to 64 at 2 bits, 256 at 8 bits.  A left shift
    fills the low ``shift`` bits of the high half from the low half (a right shift the top bits of the low half
    from the high half); those bits lie outside the mask (a >= shift; a + bits <= 10 <= 16 + shift)."""
    best = None
    for shift in {2: (6, 0, -6), 4: (2, -6), 8: (2, -6)}[bits]:
        a = k * bits + shift
        if a >= max(shift, 0) and a + bits <= 10 and (best is None or a > best[1]):
            best = (shift, a)
    assert best is not None, (bits, k)
    shift, a = best
    mask = (((1 << bits) - 1) << a) * 0x10001
    magic = ((25 - a) << 10) * 0x10001
    return shift, a, mask, magic, 1 << (10 - a)


def _key_plane_table(bits: int) -> tuple[int, int]:
    """(K_ROT, K_POS): every plane's rotation (5 bits each) and code position a (4 bits each), packed for the
    kernel, which rebuilds mask, magic and C from them exactly as _key_plane_consts does."""
    rot = pos = 0
    for k in range(16 // bits):
        shift, a, _, _, _ = _key_plane_consts(bits, k)
        rot |= (shift % 32) << (5 * k)
        pos |= a << (4 * k)
    return rot, pos


# one key plane: rotate (ptxas folds the constant rotation, and shares it between the planes that use it), then
# mask + OR the exponent; $2/$4/$6 the rotation, mask and magic (int32 operands: two registers each with pack=2)
_KEY_CODES_ASM = "{ .reg .b32 t; shf.l.wrap.b32 t, $1, $1, $2; lop3.b32 $0, t, $4, $6, 0xea; }"


def _key_codes(h, K: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr, CASM: tl.constexpr,
               K_ROT: tl.constexpr, K_POS: tl.constexpr):
    """Plane K of the int16 key code lanes h (any shape): FAST the float16 ``C_K + code`` (two instructions per
    two codes, no scale: it is folded into q), else the float32 code."""
    if FAST:
        a: tl.constexpr = (K_POS >> (4 * K)) & 15
        rot: tl.constexpr = (K_ROT >> (5 * K)) & 31
        mask: tl.constexpr = (((1 << BITS) - 1) << a) * 0x10001
        magic: tl.constexpr = ((25 - a) << 10) * 0x10001
        out = tl.inline_asm_elementwise(
            CASM, "=r,r,r,r,r,r,r,r",
            [h, tl.full(h.shape, rot, tl.int32), tl.full(h.shape, mask, tl.int32), tl.full(h.shape, magic, tl.int32)],
            dtype=tl.float16, is_pure=True, pack=2)
    else:
        out = ((h.to(tl.int32) >> (K * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    return out


def _key_plane(S, X, qk, h, s_ptrs, m_ptrs, p_mask, K: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr,
               CASM: tl.constexpr, K_ROT: tl.constexpr, K_POS: tl.constexpr, DOT_FP32: tl.constexpr,
               DT: tl.constexpr, MASKED: tl.constexpr, BLOCK_R: tl.constexpr):
    """One key plane's share of a tile's logits, all on tensor cores: ``S += (q_K s_K) . M_K^T`` (M_K = C_K + code
    from h [BLOCK_N, E]; C_K = 0 unless FAST) and ``X += q_K . mid_K^T - (q_K s_K) . (C_K + MID)``
    ([BLOCK_R, BLOCK_R]), whose diagonal is the bias that makes ``S + bias`` the logits of the dequantized keys,
    ``sum_c q (code s + min) = sum_c q s (code - MID) + q (min + MID s)``, MID = 2**(BITS - 1) the middle code.
    qk [BLOCK_R, E]: the scaled query in plane order in the dot dtype DT, one row per (key group of the tile,
    query head); s_ptrs/m_ptrs [BLOCK_R, E]: the scales/stored offsets of each row's key group in plane order.
    FAST: ``q s`` and ``mid = offset + (2**bits + MID) s`` (= min + MID s) are float16 (one rounding each, as a
    float16 dequantized tile has), products exact, sums float32; C_K + MID is exact in float16 and cancels the
    C_K + MID copies of the rounded ``q s`` exactly, so ``q s``'s rounding only meets ``code - MID`` (at most MID
    in size: half the error of meeting ``code``)."""
    OB: tl.constexpr = (1 << BITS) if BITS < 8 else 0  # kvfx.kernels.quant_pack.offset_bias
    MID: tl.constexpr = 1 << (BITS - 1)
    M = _KEY_CODES(h, K, BITS, FAST, CASM, K_ROT, K_POS)
    if MASKED:
        s = tl.load(s_ptrs, mask=p_mask, other=0.0)
        o = tl.load(m_ptrs, mask=p_mask, other=0.0)
    else:
        s = tl.load(s_ptrs)
        o = tl.load(m_ptrs)
    if FAST:
        a: tl.constexpr = (K_POS >> (4 * K)) & 15
        C: tl.constexpr = (1 << (10 - a)) + MID
        s = s.to(tl.float16)
        qs = qk * s
        mid = o.to(tl.float16) + s * (OB + MID)
        S = tl.dot(qs, tl.trans(M), S)
        X = tl.dot(qk, tl.trans(mid), X)
        X = tl.dot(qs, tl.full([qk.shape[1], BLOCK_R], -C, tl.float16), X)
    else:
        s = s.to(tl.float32)
        qs = qk.to(tl.float32) * s
        mid = o.to(tl.float32) + s * (OB + MID)
        if DOT_FP32:
            S = tl.dot(qs, tl.trans(M), S, input_precision="ieee")
            X = tl.dot(qk, tl.trans(mid), X, input_precision="ieee")
            X = tl.dot(qs, tl.full([qk.shape[1], BLOCK_R], -MID, tl.float32), X, input_precision="ieee")
        else:
            S = tl.dot(qs.to(DT), tl.trans(M.to(DT)), S)
            X = tl.dot(qk, tl.trans(mid.to(DT)), X)
            X = tl.dot(qs.to(DT), tl.full([qk.shape[1], BLOCK_R], -MID, DT), X)
    return S, X


def _res_key_plane(S, qk, r_ptrs, r_mask, DOT_FP32: tl.constexpr, DT: tl.constexpr):
    """S += q_K . r_K^T for residual (full-precision) keys r_K [BLOCK_N, E] in plane order."""
    r = tl.load(r_ptrs, mask=r_mask, other=0.0)
    if DOT_FP32:
        S = tl.dot(qk, tl.trans(r.to(tl.float32)), S, input_precision="ieee")
    else:
        S = tl.dot(qk.to(DT), tl.trans(r.to(DT)), S)
    return S


def _dequant_bytes(h, s, m, BITS: tl.constexpr, FAST: tl.constexpr, ASM: tl.constexpr):
    """All planes of int8 code lanes h (BITS 2 or 4: 8 // BITS codes per byte): (code_k * s + m for k = 0..3),
    float16 through the PTX (_asm_dequant_bytes) if FAST, else float32; s, m: h's shape.  4 bits: the last two
    entries repeat the first two."""
    if BITS == 2:
        if FAST:
            v0, v1, v2, v3 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [h, s, m],
                                                       dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                       is_pure=True, pack=4)
        else:
            c = h.to(tl.int32)
            s = s.to(tl.float32)
            m = m.to(tl.float32)
            v0 = (c & 3).to(tl.float32) * s + m
            v1 = ((c >> 2) & 3).to(tl.float32) * s + m
            v2 = ((c >> 4) & 3).to(tl.float32) * s + m
            v3 = ((c >> 6) & 3).to(tl.float32) * s + m
    else:
        if FAST:
            v0, v1 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r,r,r", [h, s, m],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            c = h.to(tl.int32)
            v0 = (c & 15).to(tl.float32) * s.to(tl.float32) + m.to(tl.float32)
            v1 = ((c >> 4) & 15).to(tl.float32) * s.to(tl.float32) + m.to(tl.float32)
        v2 = v0
        v3 = v1
    return v0, v1, v2, v3


def _value_plane(h, s, m, K: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr, ASM: tl.constexpr):
    """Plane K of int16 value code lanes h [R, E] with per-lane parameters s, m (_dequant_plane)."""
    return _DEQUANT_PLANE(h, s, m, K, BITS, FAST, ASM, h.shape[0], h.shape[1], 1)


def _value_acc(acc, p, v, r_ptrs, r_mask, use_code, DOT_FP32: tl.constexpr, DT: tl.constexpr,
               RESIDUAL: tl.constexpr):
    """acc += p . v for one dequantized value plane v [BLOCK_N, lanes]; residual rows (RESIDUAL: the tokens with
    use_code False) from r_ptrs (the plane's channels)."""
    if RESIDUAL:
        r = tl.load(r_ptrs, mask=r_mask, other=0.0).to(v.dtype)
        v = tl.where(use_code[:, None], v, r)
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p, v.to(DT), acc)
    return acc


def _store_plane(acc, l, ptrs, row_mask):
    tl.store(ptrs, (acc / l[:, None]).to(ptrs.dtype.element_ty), mask=row_mask[:, None])


def _merge_rows(acc, w, NB: tl.constexpr, GP: tl.constexpr, E: tl.constexpr):
    """[NB * GP, E] partial accumulators (row r * GP + g) -> [GP, E]: sum over r of w[r, g] * acc[r * GP + g]."""
    return tl.reduce(tl.reshape(acc, [NB, GP, E]) * w[:, :, None], 0, _SUM)


_KEY_CODES = DeviceFunction(_key_codes)
_KEY_PLANE = DeviceFunction(_key_plane)
_RES_KEY_PLANE = DeviceFunction(_res_key_plane)
_DEQUANT_BYTES = DeviceFunction(_dequant_bytes)
_VALUE_PLANE = DeviceFunction(_value_plane)
_VALUE_ACC = DeviceFunction(_value_acc)
_STORE_PLANE = DeviceFunction(_store_plane)
_MERGE_ROWS = DeviceFunction(_merge_rows)


def _quant_plane_kernel(
    Q, KC, KS, KM, VC, VS, VM, KR, VR, M, O, Opart, Lse,
    KA, KB, KSEG, KOI, KOV,
    VA, VB, VSEG, VOI, VOV,
    stride_qb, stride_qh,
    stride_kcb, stride_kch, stride_kcn,
    stride_ksb, stride_ksh, stride_ksg,
    stride_vcb, stride_vch, stride_vcn,
    stride_vsb, stride_vsh, stride_vsn,
    stride_krb, stride_krh, stride_krn,
    stride_vrb, stride_vrh, stride_vrn,
    stride_mb, stride_mn,
    stride_ob, stride_oh,
    stride_kab, stride_kah, stride_kan,
    stride_kbb, stride_kbh, stride_kbs, stride_kbd,
    stride_ksegb, stride_ksegh, stride_ksegn,
    stride_koib, stride_koih, stride_koig, stride_koij,
    stride_vab, stride_vah, stride_van,
    stride_vbb, stride_vbh, stride_vbs, stride_vbd,
    stride_vsegb, stride_vsegh, stride_vsegn,
    stride_voib, stride_voih, stride_voin,
    n_qk, n_qv, kv_len, num_splits, Hkv, lr_block, rank_k, rank_v,
    sm_scale, softcap,
    TUNE_KEY,  # unused by the body: only part of the autotuning key
    QGROUP: tl.constexpr,  # query heads per KV head
    QGROUP_P2: tl.constexpr,  # next power of two
    BLOCK_G: tl.constexpr,  # unused (the split kernel's row block)
    HEAD_DIM: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VALUE_N: tl.constexpr,  # value dot columns to aim for: 8 per warp (see VBYTES)
    TAIL_N: tl.constexpr,  # tokens per tile of the tail (phase 1) at most
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    FAST: tl.constexpr,  # PTX: float16 key planes C + code and float16 dequantized value planes (CUDA)
    K_ASM: tl.constexpr,  # unused (the split kernel's key PTX)
    V_ASM: tl.constexpr,  # the PTX of _asm_dequant(V_BITS)
    V_ASM_BYTES: tl.constexpr,  # _asm_dequant_bytes(V_BITS) (2 and 4 bits; else unused)
    K_CASM: tl.constexpr,  # _KEY_CODES_ASM
    K_ROT: tl.constexpr,  # _key_plane_table(K_BITS)
    K_POS: tl.constexpr,
    K_GROUP: tl.constexpr,  # tokens per key group
    V_GROUP: tl.constexpr,  # channels per value group
    MASK_KIND: tl.constexpr,  # 0: none, 1: bool (nonzero = attend), 2: additive float bias
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,  # float32 dot operands, IEEE products
    DIRECT_OUT: tl.constexpr,  # num_splits == 1: write the final output in O's dtype
    K_LOWRANK: tl.constexpr,  # must be False (GEAR runs the split kernel)
    V_LOWRANK: tl.constexpr,
    K_OUTLIERS: tl.constexpr,
    V_OUTLIERS: tl.constexpr,
    RANK_PAD: tl.constexpr,
    LR_ALIGN: tl.constexpr,
    STATIC: tl.constexpr,  # interpreter: constexpr trip counts STATIC_BULK / STATIC_TAIL (masked overshoot)
    STATIC_BULK: tl.constexpr,
    STATIC_TAIL: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    KP: tl.constexpr = 16 // K_BITS  # codes (planes) per 16-bit lane
    VP: tl.constexpr = 16 // V_BITS
    KE: tl.constexpr = HEAD_DIM // KP  # int16 lanes per key row
    VE: tl.constexpr = HEAD_DV // VP
    # value lanes: int16 (VP codes), or bytes (VP / 2 codes) when int16 lanes would make the value dots narrower
    # than VALUE_N columns (8 per warp: Triton gives every dot of a chain the warp layout of the last one, and a
    # square [16, 16] dot would be split along M, i.e. replicated on every warp)
    VBYTES: tl.constexpr = (VE < VALUE_N) & (V_BITS < 8)
    VW: tl.constexpr = 2 * VE if VBYTES else VE  # value lanes per token
    NV: tl.constexpr = VP // 2 if VBYTES else VP  # codes per value lane: value planes (dots, accumulators)
    VLPG: tl.constexpr = V_GROUP // NV  # value lanes per value group: lane l's group is l // VLPG
    VNG: tl.constexpr = HEAD_DV // V_GROUP  # value groups per token
    KGR: tl.constexpr = BLOCK_N // K_GROUP if BLOCK_N > K_GROUP else 1  # key groups per tile
    TN_TAIL: tl.constexpr = BLOCK_N if BLOCK_N < TAIL_N else TAIL_N
    GP: tl.constexpr = QGROUP_P2
    BLOCK_R: tl.constexpr = 16 if GP * KGR < 16 else GP * KGR  # stacked rows: (key group of the tile, head)
    pid = tl.program_id(0)
    split = pid % num_splits
    bh = pid // num_splits
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)

    offs_ke = tl.arange(0, KE)
    vc_tile = VC.to(tl.pointer_type(tl.int8)) if VBYTES else VC  # the value codes as int16 or int8 lanes
    vc_row = 2 * stride_vcn if VBYTES else stride_vcn
    offs_r = tl.arange(0, BLOCK_R)
    r_blk = offs_r // GP  # the row's key group within the tile
    g_row = offs_r % GP  # the row's query head within the group
    row_valid = (g_row < QGROUP) & (r_blk < KGR)
    r_eff = tl.where(r_blk < KGR, r_blk, 0)  # padding rows read group 0's parameters (their q is 0)
    hq_r = hk * QGROUP + g_row  # int64

    # q in plane order, float32 [BLOCK_R, KE] per plane (plane k of lane l: channel (l // 2) * 2KP + 2k + l % 2),
    # scaled (and to log2 units) unless the softcap needs the raw logits
    q_scale = sm_scale * LOG2E if not HAS_SOFTCAP else 1.0
    q_rows = Q + b * stride_qb + hq_r[:, None] * stride_qh
    kch0 = (offs_ke // 2) * (2 * KP) + offs_ke % 2  # plane 0's channels; plane k: + 2k
    q0 = tl.load(q_rows + kch0[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32) * q_scale
    q1 = q0
    q2 = q0
    q3 = q0
    q4 = q0
    q5 = q0
    q6 = q0
    q7 = q0
    if KP > 1:
        q1 = tl.load(q_rows + (kch0 + 2)[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32) * q_scale
    if KP > 2:
        q2 = tl.load(q_rows + (kch0 + 4)[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32) * q_scale
        q3 = tl.load(q_rows + (kch0 + 6)[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32) * q_scale
    if KP > 4:
        q4 = tl.load(q_rows + (kch0 + 8)[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32) * q_scale
        q5 = tl.load(q_rows + (kch0 + 10)[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32) * q_scale
        q6 = tl.load(q_rows + (kch0 + 12)[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32) * q_scale
        q7 = tl.load(q_rows + (kch0 + 14)[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32) * q_scale
    if DOT_FP32:
        p_dt = tl.float32
    elif FAST:
        p_dt = tl.float16
    else:
        p_dt = Q.dtype.element_ty
    q0 = q0.to(p_dt)  # the dot operands (FAST: float16, as exact as bfloat16 or better in q's range)
    q1 = q1.to(p_dt)
    q2 = q2.to(p_dt)
    q3 = q3.to(p_dt)
    q4 = q4.to(p_dt)
    q5 = q5.to(p_dt)
    q6 = q6.to(p_dt)
    q7 = q7.to(p_dt)

    per_split = (kv_len + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)
    n_bulk = tl.minimum(n_qk, n_qv) // BLOCK_N * BLOCK_N

    kc_base = KC + b * stride_kcb + hk * stride_kch
    ks_base = KS + b * stride_ksb + hk * stride_ksh  # KM shares KS's strides
    km_base = KM + b * stride_ksb + hk * stride_ksh
    vc_base = vc_tile + (b * stride_vcb + hk * stride_vch) * (2 if VBYTES else 1)
    vs_base = VS + b * stride_vsb + hk * stride_vsh  # VM shares VS's strides
    vm_base = VM + b * stride_vsb + hk * stride_vsh
    kr_base = KR + b * stride_krb + hk * stride_krh
    vr_base = VR + b * stride_vrb + hk * stride_vrh
    m_base = M + b * stride_mb

    # loop-invariant offsets, int32 (each tile adds one int64 scalar per tensor): parameters and channels
    kp_off = r_eff[:, None] * stride_ksg + kch0[None, :]  # [BLOCK_R, KE] key parameters, plane 0; plane k: + 2k
    vg_off = tl.arange(0, VNG)[None, :]  # value groups (parameters: [tn, VNG], broadcast over the lanes)
    # value lane l, plane k: word l // LPW (LPW lanes per 32-bit word), channel word * 2VP + t * VP + 2k + h, with
    # h the word's 16-bit half and t the byte of the half (bytes; int16 lanes: t = 0)
    offs_vw = tl.arange(0, VW)
    if VBYTES:
        vch0 = (offs_vw // 4) * (2 * VP) + (offs_vw % 2) * VP + (offs_vw % 4) // 2  # plane k: + 2k
    else:
        vch0 = (offs_vw // 2) * (2 * VP) + offs_vw % 2
    eye = offs_r[:, None] == offs_r[None, :]

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_R], 0.0, tl.float32)
    a0 = tl.zeros([BLOCK_R, VW], tl.float32)
    a1 = tl.zeros([BLOCK_R, VW], tl.float32)
    a2 = tl.zeros([BLOCK_R, VW], tl.float32)
    a3 = tl.zeros([BLOCK_R, VW], tl.float32)
    a4 = tl.zeros([BLOCK_R, VW], tl.float32)
    a5 = tl.zeros([BLOCK_R, VW], tl.float32)
    a6 = tl.zeros([BLOCK_R, VW], tl.float32)
    a7 = tl.zeros([BLOCK_R, VW], tl.float32)

    # phase 0: full BLOCK_N tiles below n_bulk, codes only, no masks (compiled), pipelined; phase 1: the rest in
    # tiles of TN_TAIL (fewer registers: the kernel's register count is the larger loop's), each token from codes
    # or the residual buffer, masked, not pipelined.  Interpreter: constexpr trip counts, every load masked
    # (overshoot tiles are fully masked and change nothing).
    for phase in tl.static_range(1, -1, -1):  # the tail first: its loop invariants die before the bulk loop
        # per-phase constants are written out where a constexpr is required (a name assigned in a static_range
        # body is a tensor, and a constexpr cannot be reassigned): tokens per tile BLOCK_N if phase == 0 else
        # TN_TAIL; loads masked if STATIC or phase == 1; the bias folded into the row statistics if phase == 0 and
        # not HAS_SOFTCAP
        tn = BLOCK_N if phase == 0 else TN_TAIL
        kgt = K_GROUP if (BLOCK_N if phase == 0 else TN_TAIL) > K_GROUP else tn  # tokens per key group in a tile
        if phase == 0:
            lo = start
            hi = tl.minimum(end, n_bulk)
        else:
            lo = tl.maximum(start, n_bulk)
            hi = end
        offs_n = tl.arange(0, BLOCK_N if phase == 0 else TN_TAIL)
        kc_off = offs_n[:, None] * stride_kcn + offs_ke[None, :]  # [tn, KE]
        vc_off = offs_n[:, None] * vc_row + offs_vw[None, :]  # [tn, VW]
        vp_off = offs_n[:, None] * stride_vsn + vg_off
        kr_off = offs_n[:, None] * stride_krn + kch0[None, :]  # [tn, KE] residual keys, plane 0
        vr_off = offs_n[:, None] * stride_vrn + vch0[None, :]  # [tn, VW] residual values, dot 0
        diag = (offs_n // kgt)[None, :] == r_blk[:, None]  # token n of a tile: the rows of its key group
        for it in tl.range(0, (STATIC_BULK if phase == 0 else STATIC_TAIL) if STATIC else
                           (tl.maximum(hi - lo, 0) + tn - 1) // tn, num_stages=None if phase == 0 else 1):
            t0 = lo + it * tn  # the tile's first token: a multiple of tn (and so of kgt)
            t0l = t0.to(tl.int64)
            cols = t0 + offs_n
            n_valid = cols < hi
            kg0 = (t0 // K_GROUP).to(tl.int64)  # the tile's first key group

            # ---- keys: S = sum_k (q_k s_k) . (C_k + code_k)^T; bias = diag(X) ----
            if STATIC or phase == 1:
                kh = tl.load(kc_base + t0l * stride_kcn + kc_off, mask=(n_valid & (cols < n_qk))[:, None], other=0)
                # row r holds key group kg0 + r: load it only if that group is stored and reaches below hi (a
                # tail tile inside one group uses row 0 alone; its other rows must not read past the last group)
                p_mask = ((t0 // K_GROUP + r_eff) * K_GROUP < tl.minimum(hi, n_qk))[:, None]
            else:
                kh = tl.load(kc_base + t0l * stride_kcn + kc_off)
                p_mask = row_valid[:, None]  # unused (a tensor: the phase-1 loop carries the name)
            ks_t = ks_base + kg0 * stride_ksg + kp_off
            km_t = km_base + kg0 * stride_ksg + kp_off
            S = tl.zeros([BLOCK_R, BLOCK_N if phase == 0 else TN_TAIL], tl.float32)
            X = tl.zeros([BLOCK_R, BLOCK_R], tl.float32)
            S, X = _KEY_PLANE(S, X, q0, kh, ks_t, km_t, p_mask, 0, K_BITS, FAST, K_CASM, K_ROT, K_POS,
                              DOT_FP32, p_dt, STATIC or phase == 1, BLOCK_R)
            if KP > 1:
                S, X = _KEY_PLANE(S, X, q1, kh, ks_t + 2, km_t + 2, p_mask, 1, K_BITS, FAST, K_CASM, K_ROT, K_POS,
                                  DOT_FP32, p_dt, STATIC or phase == 1, BLOCK_R)
            if KP > 2:
                S, X = _KEY_PLANE(S, X, q2, kh, ks_t + 4, km_t + 4, p_mask, 2, K_BITS, FAST, K_CASM, K_ROT, K_POS,
                                  DOT_FP32, p_dt, STATIC or phase == 1, BLOCK_R)
                S, X = _KEY_PLANE(S, X, q3, kh, ks_t + 6, km_t + 6, p_mask, 3, K_BITS, FAST, K_CASM, K_ROT, K_POS,
                                  DOT_FP32, p_dt, STATIC or phase == 1, BLOCK_R)
            if KP > 4:
                S, X = _KEY_PLANE(S, X, q4, kh, ks_t + 8, km_t + 8, p_mask, 4, K_BITS, FAST, K_CASM, K_ROT, K_POS,
                                  DOT_FP32, p_dt, STATIC or phase == 1, BLOCK_R)
                S, X = _KEY_PLANE(S, X, q5, kh, ks_t + 10, km_t + 10, p_mask, 5, K_BITS, FAST, K_CASM, K_ROT,
                                  K_POS, DOT_FP32, p_dt, STATIC or phase == 1, BLOCK_R)
                S, X = _KEY_PLANE(S, X, q6, kh, ks_t + 12, km_t + 12, p_mask, 6, K_BITS, FAST, K_CASM, K_ROT,
                                  K_POS, DOT_FP32, p_dt, STATIC or phase == 1, BLOCK_R)
                S, X = _KEY_PLANE(S, X, q7, kh, ks_t + 14, km_t + 14, p_mask, 7, K_BITS, FAST, K_CASM, K_ROT,
                                  K_POS, DOT_FP32, p_dt, STATIC or phase == 1, BLOCK_R)
            bias = tl.reduce(tl.where(eye, X, 0.0), 1, _SUM)  # [BLOCK_R]: the logits are S + bias, log2 units
            if not (phase == 0 and not HAS_SOFTCAP):  # else the bias moves into the row statistics
                S = S + bias[:, None]
            if phase == 1:  # residual keys: q . k_res in plane order
                R = tl.zeros([BLOCK_R, BLOCK_N if phase == 0 else TN_TAIL], tl.float32)
                r_ptrs = kr_base + (t0l - n_qk) * stride_krn + kr_off
                r_mask = (n_valid & (cols >= n_qk))[:, None]
                R = _RES_KEY_PLANE(R, q0, r_ptrs, r_mask, DOT_FP32, p_dt)
                if KP > 1:
                    R = _RES_KEY_PLANE(R, q1, r_ptrs + 2, r_mask, DOT_FP32, p_dt)
                if KP > 2:
                    R = _RES_KEY_PLANE(R, q2, r_ptrs + 4, r_mask, DOT_FP32, p_dt)
                    R = _RES_KEY_PLANE(R, q3, r_ptrs + 6, r_mask, DOT_FP32, p_dt)
                if KP > 4:
                    R = _RES_KEY_PLANE(R, q4, r_ptrs + 8, r_mask, DOT_FP32, p_dt)
                    R = _RES_KEY_PLANE(R, q5, r_ptrs + 10, r_mask, DOT_FP32, p_dt)
                    R = _RES_KEY_PLANE(R, q6, r_ptrs + 12, r_mask, DOT_FP32, p_dt)
                    R = _RES_KEY_PLANE(R, q7, r_ptrs + 14, r_mask, DOT_FP32, p_dt)
                S = tl.where((cols < n_qk)[None, :], S, R)
            if HAS_SOFTCAP:  # as the split kernel: softcap * tanh(s / softcap) in log2 units
                S = S * sm_scale
                x = S / softcap
                ax = tl.abs(x)
                e = tl.exp2(ax * (-2.0 * LOG2E))
                th_big = (1.0 - e) / (1.0 + e)
                x2 = x * x
                th_small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
                th = tl.where(ax < 0.125, th_small, th_big)
                S = (softcap * LOG2E) * tl.where(x < 0, -th, th)
            if MASK_KIND == 1:
                if STATIC or phase == 1:
                    mv = tl.load(m_base + cols.to(tl.int64) * stride_mn, mask=n_valid, other=0)
                else:
                    mv = tl.load(m_base + cols.to(tl.int64) * stride_mn)
                S = tl.where((mv != 0)[None, :], S, float("-inf"))
            elif MASK_KIND == 2:
                if STATIC or phase == 1:
                    mb = tl.load(m_base + cols.to(tl.int64) * stride_mn, mask=n_valid, other=0.0)
                else:
                    mb = tl.load(m_base + cols.to(tl.int64) * stride_mn)
                S = S + mb.to(tl.float32)[None, :] * LOG2E
            if KGR > 1:  # (a tail tile within one key group feeds rows r = 0 only)
                S = tl.where(diag, S, float("-inf"))
            if STATIC or phase == 1:
                S = tl.where(n_valid[None, :], S, float("-inf"))

            if phase == 0 and not HAS_SOFTCAP:
                m_new = tl.maximum(m_i, tl.reduce(S, 1, _MAX) + bias)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
                p = tl.exp2(S - (m_use - bias)[:, None])
            else:
                m_new = tl.maximum(m_i, tl.reduce(S, 1, _MAX))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(S - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
            m_i = m_new
            p = p.to(p_dt)

            # ---- values: acc_k += p . V_k per plane, dequantized with per-lane (token, group) parameters ----
            if STATIC or phase == 1:
                vq_mask = (n_valid & (cols < n_qv))[:, None]
                vh = tl.load(vc_base + t0l * vc_row + vc_off, mask=vq_mask, other=0)
                vs = tl.load(vs_base + t0l * stride_vsn + vp_off, mask=vq_mask, other=0.0)
                vm = tl.load(vm_base + t0l * stride_vsn + vp_off, mask=vq_mask, other=0.0)
            else:
                vh = tl.load(vc_base + t0l * vc_row + vc_off)
                vs = tl.load(vs_base + t0l * stride_vsn + vp_off)
                vm = tl.load(vm_base + t0l * stride_vsn + vp_off)
            # one (scale, offset) per (token, group), broadcast over the group's lanes
            vs = tl.reshape(tl.broadcast_to(vs[:, :, None], [BLOCK_N if phase == 0 else TN_TAIL, VNG, VLPG]),
                            [BLOCK_N if phase == 0 else TN_TAIL, VW])
            vm = tl.reshape(tl.broadcast_to(vm[:, :, None], [BLOCK_N if phase == 0 else TN_TAIL, VNG, VLPG]),
                            [BLOCK_N if phase == 0 else TN_TAIL, VW])
            vs, vm = _DEQUANT_PARAMS(vs, vm, V_BITS, FAST)
            vr = vr_base + (t0l - n_qv) * stride_vrn + vr_off  # residual values of plane k: + 2k
            vr_mask = (n_valid & (cols >= n_qv))[:, None]
            use_code = cols < n_qv
            if VBYTES:  # every plane of the bytes at once (the byte shuffles shared)
                v0, v1, v2, v3 = _DEQUANT_BYTES(vh, vs, vm, V_BITS, FAST, V_ASM_BYTES)
            else:
                v0 = _VALUE_PLANE(vh, vs, vm, 0, V_BITS, FAST, V_ASM)
                v1 = v0
                v2 = v0
                v3 = v0
                if NV > 1:
                    v1 = _VALUE_PLANE(vh, vs, vm, 1, V_BITS, FAST, V_ASM)
                if NV > 2:
                    v2 = _VALUE_PLANE(vh, vs, vm, 2, V_BITS, FAST, V_ASM)
                    v3 = _VALUE_PLANE(vh, vs, vm, 3, V_BITS, FAST, V_ASM)
            a0 = _VALUE_ACC(a0 * alpha[:, None], p, v0, vr, vr_mask, use_code, DOT_FP32, p_dt, phase == 1)
            if NV > 1:
                a1 = _VALUE_ACC(a1 * alpha[:, None], p, v1, vr + 2, vr_mask, use_code, DOT_FP32, p_dt, phase == 1)
            if NV > 2:
                a2 = _VALUE_ACC(a2 * alpha[:, None], p, v2, vr + 4, vr_mask, use_code, DOT_FP32, p_dt, phase == 1)
                a3 = _VALUE_ACC(a3 * alpha[:, None], p, v3, vr + 6, vr_mask, use_code, DOT_FP32, p_dt, phase == 1)
            if NV > 4:  # (int16 lanes only)
                v0 = _VALUE_PLANE(vh, vs, vm, 4, V_BITS, FAST, V_ASM)
                a4 = _VALUE_ACC(a4 * alpha[:, None], p, v0, vr + 8, vr_mask, use_code, DOT_FP32, p_dt, phase == 1)
                v1 = _VALUE_PLANE(vh, vs, vm, 5, V_BITS, FAST, V_ASM)
                a5 = _VALUE_ACC(a5 * alpha[:, None], p, v1, vr + 10, vr_mask, use_code, DOT_FP32, p_dt, phase == 1)
                v2 = _VALUE_PLANE(vh, vs, vm, 6, V_BITS, FAST, V_ASM)
                a6 = _VALUE_ACC(a6 * alpha[:, None], p, v2, vr + 12, vr_mask, use_code, DOT_FP32, p_dt, phase == 1)
                v3 = _VALUE_PLANE(vh, vs, vm, 7, V_BITS, FAST, V_ASM)
                a7 = _VALUE_ACC(a7 * alpha[:, None], p, v3, vr + 14, vr_mask, use_code, DOT_FP32, p_dt, phase == 1)

    # merge the stacked rows of each query head (row r * GP + g: the tokens of key group r of every tile), as the
    # combine kernel merges splits; then store every plane at its channels
    if KGR > 1:
        NB: tl.constexpr = BLOCK_R // GP
        m3 = tl.reshape(m_i, [NB, GP])
        m_f = tl.reduce(m3, 0, _MAX)
        m_fu = tl.where(m_f == float("-inf"), 0.0, m_f)
        w = tl.exp2(m3 - m_fu[None, :])  # 0 for empty rows
        l_f = tl.reduce(tl.reshape(l_i, [NB, GP]) * w, 0, _SUM)
        a0 = _MERGE_ROWS(a0, w, NB, GP, VW)
        if NV > 1:
            a1 = _MERGE_ROWS(a1, w, NB, GP, VW)
        if NV > 2:
            a2 = _MERGE_ROWS(a2, w, NB, GP, VW)
            a3 = _MERGE_ROWS(a3, w, NB, GP, VW)
        if NV > 4:
            a4 = _MERGE_ROWS(a4, w, NB, GP, VW)
            a5 = _MERGE_ROWS(a5, w, NB, GP, VW)
            a6 = _MERGE_ROWS(a6, w, NB, GP, VW)
            a7 = _MERGE_ROWS(a7, w, NB, GP, VW)
        g_out = tl.arange(0, GP)
        out_valid = g_out < QGROUP
    else:
        m_f = m_i
        l_f = l_i
        g_out = offs_r
        out_valid = (r_blk == 0) & (g_row < QGROUP)
    hq = hk * QGROUP + g_out  # int64
    l_safe = tl.where(l_f == 0.0, 1.0, l_f)  # l == 0 only if every token was masked: acc == 0
    if DIRECT_OUT:
        o_ptrs = O + b * stride_ob + hq[:, None] * stride_oh + vch0[None, :]
    else:
        # Opart: [B, Hq, num_splits, Dv] fp32 contiguous; Lse: [B, Hq, num_splits] fp32 (log2 units)
        row = (b * (Hkv * QGROUP) + hq) * num_splits + split
        o_ptrs = Opart + row[:, None] * HEAD_DV + vch0[None, :]
        lse = tl.where(l_f == 0.0, float("-inf"), m_f + tl.log2(l_safe))
        tl.store(Lse + row, lse, mask=out_valid)
    _STORE_PLANE(a0, l_safe, o_ptrs, out_valid)
    if NV > 1:
        _STORE_PLANE(a1, l_safe, o_ptrs + 2, out_valid)
    if NV > 2:
        _STORE_PLANE(a2, l_safe, o_ptrs + 4, out_valid)
        _STORE_PLANE(a3, l_safe, o_ptrs + 6, out_valid)
    if NV > 4:
        _STORE_PLANE(a4, l_safe, o_ptrs + 8, out_valid)
        _STORE_PLANE(a5, l_safe, o_ptrs + 10, out_valid)
        _STORE_PLANE(a6, l_safe, o_ptrs + 12, out_valid)
        _STORE_PLANE(a7, l_safe, o_ptrs + 14, out_valid)


_PLANE_JIT = JITFunction(_quant_plane_kernel, do_not_specialize=[
    "n_qk", "n_qv", "kv_len", "num_splits", "Hkv", "lr_block", "rank_k", "rank_v", "TUNE_KEY"])

_PLANE_VALUE_N = 32  # value dot columns to aim for: 8 per warp at 4 warps (the kernel's VALUE_N)
_PLANE_TAIL_N = 16  # tail (phase 1) tile: the fewest registers (the kernel's register count is its larger loop's)
_INTERPRET_VALUE_N = 32  # (tests lower it to run the int16 value lanes at small head dims)
_INTERPRET_TAIL_N = 16
# Without autotuning: 4 warps, 128 tokens, registers capped at 168 (3 programs per SM; sm_90 SASS offline, d = 128,
# G = 4, Triton 3.6: no spills in the bulk loop, ~27 (4 bits) / ~34 (2 bits) warp instructions per token).
_PLANE_FIXED_GPU_CONFIG = dict(BLOCK_N=128, num_warps=4, num_stages=2, maxnreg=168)


def _plane_rows(block_n: int, k_group: int, g_p2: int) -> int:
    """BLOCK_R of the plane kernel: one row per (key group of the tile, query head), at least 16."""
    return max(16, g_p2 * max(1, block_n // k_group))


def _plane_autotune_configs():
    """4 warps only (a program's rows are one 16-row tensor-core tile, so more warps split the tokens and replicate
    the query operands); 128-token tiles halve the per-tile costs, 64-token tiles need ~170 registers; caps of 168
    (3 programs per SM) and 128 (4) trade spills for occupancy."""
    return [triton.Config({"BLOCK_N": n, "VALUE_N": _PLANE_VALUE_N}, num_warps=4, num_stages=st, maxnreg=r)
            for n, st, r in [(128, 2, 168), (128, 3, 168), (128, 2, None), (128, 2, 128), (64, 2, None),
                             (64, 3, 168), (64, 2, 128), (32, 2, None)]]


def _plane_prune_configs(configs, named_args, **kwargs):
    """Keep the configs whose stacked rows fit in max(16, G) (the key groups of a tile fill the padding of the
    16-row tensor-core tile rather than adding rows)."""
    g_p2, k_group = kwargs["QGROUP_P2"], kwargs["K_GROUP"]
    rows = lambda c: _plane_rows(c.kwargs["BLOCK_N"], k_group, g_p2)  # noqa: E731
    kept = [c for c in configs if rows(c) <= max(16, g_p2)]
    return kept or [min(configs, key=lambda c: (rows(c), -c.kwargs["BLOCK_N"]))]


_PLANE_TUNED = triton.autotune(
    configs=_plane_autotune_configs(),
    key=["HEAD_DIM", "HEAD_DV", "QGROUP", "K_BITS", "V_BITS", "K_GROUP", "V_GROUP", "MASK_KIND", "TUNE_KEY"],
    prune_configs_by={"early_config_prune": _plane_prune_configs},
)(_PLANE_JIT)


def _plane_fixed_config(k_group: int, g_p2: int) -> dict:
    """_PLANE_FIXED_GPU_CONFIG with BLOCK_N halved until the stacked rows fit (as _plane_prune_configs)."""
    config = dict(_PLANE_FIXED_GPU_CONFIG, VALUE_N=_PLANE_VALUE_N)
    while config["BLOCK_N"] > 32 and _plane_rows(config["BLOCK_N"], k_group, g_p2) > max(16, g_p2):
        config["BLOCK_N"] //= 2
    return config


def _plane_value_lanes(head_dv: int, bits: int, value_n: int) -> int:
    """The plane kernel's value lanes per token (its VW): int16 lanes, or bytes when those are fewer than value_n."""
    lanes = head_dv // (16 // bits)
    return 2 * lanes if lanes < value_n and bits < 8 else lanes


def _use_planes(keys: Quantized, values: Quantized, D: int, Dv: int, G: int, gear: bool, interpret: bool) -> bool:
    """Whether the plane-order kernel runs: KIVI caches (GEAR terms run the split kernel) when KVFX_QUANT_PLANES
    selects it.  Compiled, also: key dots of K >= 16 (D // (16 // bits) lanes), value dots at least 32 lanes wide
    and at most 16 query heads per KV head (wider or taller dots would be replicated across warps, see
    _value_acc); the split kernel runs the rest."""
    if gear or not _planes_enabled():
        return False
    if interpret:
        return True
    return (D // (16 // keys.bits) >= 16 and _plane_value_lanes(Dv, values.bits, _PLANE_VALUE_N) >= 32
            and triton.next_power_of_2(G) <= 16)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ()))


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or isinstance(value, Tensor) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be a Python int, got {type(value).__name__}")
    return int(value)


def _check_quantized(qt, name: str, kind: str, B: int, Hkv: int, dev) -> None:
    if not isinstance(qt, Quantized):
        raise ValueError(f"{name} must be a kvfx.kernels.quant_pack.Quantized, got {type(qt).__name__}")
    if qt.kind != kind:
        raise ValueError(f"{name} must hold {kind}, got {qt.kind}")
    if qt.bits not in BITS:
        raise ValueError(f"{name}.bits must be one of {BITS}, got {qt.bits}")
    codes, scale, mn = qt.codes, qt.scale, qt.offset
    if codes.dim() != 4 or codes.dtype != torch.int32 or tuple(codes.shape[:2]) != (B, Hkv):
        raise ValueError(f"{name}.codes must be int32 [B, Hkv, T, C // per] = [{B}, {Hkv}, T, ...], got "
                         f"{codes.dtype} {_shape(codes)}")
    C = qt.head_dim
    t = codes.shape[2]
    want = (B, Hkv, t // qt.group, C) if kind == "keys" else (B, Hkv, t, C // max(qt.group, 1))
    if kind == "values" and C % qt.group:
        raise ValueError(f"{name}.group {qt.group} must divide its head_dim {C}")
    for part_name, part in (("scale", scale), ("offset", mn)):
        if not isinstance(part, Tensor) or tuple(part.shape) != want or part.dtype not in _da._SUPPORTED_DTYPES:
            raise ValueError(f"{name}.{part_name} must be a float [{', '.join(map(str, want))}] tensor, got "
                             f"{getattr(part, 'dtype', None)} {_shape(part)}")
    if mn.stride() != scale.stride():
        raise ValueError(f"{name}.offset must have the strides of {name}.scale")
    for t_ in (codes, scale, mn):
        if t_.device != dev:
            raise ValueError(f"{name} must be on {dev}, got {t_.device}")
        if t_.shape[-1] > 1 and t_.stride(-1) != 1:
            raise ValueError(f"{name}: every tensor needs a contiguous last dim")


def _check_gear(gear, name: str, qt: Quantized, B: int, Hkv: int, C: int, n_quant: int, dev) -> None:
    if gear is None:
        return
    if not isinstance(gear, GearTerms):
        raise ValueError(f"{name} must be a kvfx.kernels.gear.GearTerms or None, got {type(gear).__name__}")
    t = qt.tokens
    if gear.lr_a is not None:
        a, b, seg = gear.lr_a, gear.lr_b, gear.lr_seg
        if not isinstance(a, Tensor) or a.dim() != 4 or tuple(a.shape[:3]) != (B, Hkv, t) or \
                not 1 <= a.shape[3] <= MAX_RANK or a.dtype not in _da._SUPPORTED_DTYPES:
            raise ValueError(f"{name}.lr_a must be a float [{B}, {Hkv}, {t}, r] tensor with 1 <= r <= {MAX_RANK}, "
                             f"got {getattr(a, 'dtype', None)} {_shape(a)}")
        r = a.shape[3]
        if not isinstance(b, Tensor) or b.dim() != 5 or tuple(b.shape[:2]) != (B, Hkv) or b.shape[2] < 1 or \
                tuple(b.shape[3:]) != (C, r) or b.dtype not in _da._SUPPORTED_DTYPES:
            raise ValueError(f"{name}.lr_b must be a float [{B}, {Hkv}, S, {C}, {r}] tensor, got "
                             f"{getattr(b, 'dtype', None)} {_shape(b)}")
        lr_block = gear.lr_block
        if isinstance(lr_block, bool) or not isinstance(lr_block, int) or lr_block < 16 or lr_block % 16:
            raise ValueError(f"{name}.lr_block must be a positive multiple of 16, got {lr_block!r}")
        nblk = -(-n_quant // lr_block)
        if not isinstance(seg, Tensor) or seg.dim() != 3 or seg.dtype not in (torch.int32, torch.int64) or \
                seg.shape[0] not in (1, B) or seg.shape[1] not in (1, Hkv) or seg.shape[2] < nblk:
            raise ValueError(f"{name}.lr_seg must be an int [B|1, Hkv|1, >= {nblk}] tensor (one segment per "
                             f"{lr_block}-token block), got {getattr(seg, 'dtype', None)} {_shape(seg)}")
        if dev.type == "cpu" and nblk and (int(seg[..., :nblk].min()) < 0 or int(seg[..., :nblk].max()) >= b.shape[2]):
            raise ValueError(f"{name}.lr_seg entries must index the {b.shape[2]} segments of lr_b")
        for t_ in (a, b, seg):
            if t_.device != dev:
                raise ValueError(f"{name} must be on {dev}, got {t_.device}")
        if a.stride(-1) != 1 or b.stride(-1) != 1:
            raise ValueError(f"{name}.lr_a and lr_b need a contiguous last dim")
    if gear.out_idx is not None:
        oi, ov = gear.out_idx, gear.out_val
        if qt.kind == "keys":
            ok = oi.dim() == 5 and tuple(oi.shape[:3]) == (B, Hkv, t // qt.group) and oi.shape[4] == C
            want = f"[{B}, {Hkv}, {t // qt.group}, n_out, {C}]"
        else:
            ok = oi.dim() == 4 and tuple(oi.shape[:3]) == (B, Hkv, t)
            want = f"[{B}, {Hkv}, {t}, n_out]"
        if not ok or oi.dtype != torch.uint8:
            raise ValueError(f"{name}.out_idx must be a uint8 {want} tensor, got {oi.dtype} {_shape(oi)}")
        if not isinstance(ov, Tensor) or tuple(ov.shape) != tuple(oi.shape) or not ov.dtype.is_floating_point:
            raise ValueError(f"{name}.out_val must be a float tensor of out_idx's shape {_shape(oi)}, got "
                             f"{_shape(ov)}")
        if ov.stride() != oi.stride() or oi.stride(-1) != 1:
            raise ValueError(f"{name}.out_idx and out_val need the same strides and a contiguous last dim")
        if oi.device != dev or ov.device != dev:
            raise ValueError(f"{name} must be on {dev}")


def _check_inputs(q, keys, values, k_res, v_res, k_quantized, v_quantized, kv_len, mask, scale, softcap,
                  num_splits, k_gear, v_gear) -> tuple[int, int, int]:
    if not isinstance(q, Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [B, Hq, D] tensor, got shape {_shape(q)}")
    B, Hq, D = q.shape
    dev = q.device
    if not isinstance(keys, Quantized) or not isinstance(values, Quantized):
        raise ValueError("keys and values must be kvfx.kernels.quant_pack.Quantized")
    Hkv = keys.codes.shape[1] if keys.codes.dim() == 4 else 0
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of the KV heads ({Hkv})")
    _check_quantized(keys, "keys", "keys", B, Hkv, dev)
    _check_quantized(values, "values", "values", B, Hkv, dev)
    if keys.head_dim != D:
        raise ValueError(f"keys head_dim {keys.head_dim} does not match q head_dim {D}")
    Dv = values.head_dim
    for name, res, c in (("k_res", k_res, D), ("v_res", v_res, Dv)):
        if not isinstance(res, Tensor) or res.dim() != 4 or tuple(res.shape[:2]) != (B, Hkv) or res.shape[3] != c:
            raise ValueError(f"{name} must be a [{B}, {Hkv}, R, {c}] tensor, got {_shape(res)}")
        if res.device != dev:
            raise ValueError(f"{name} must be on {dev}, got {res.device}")
        if not res.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {res.dtype}")
    k_quantized = _as_int(k_quantized, "k_quantized")
    v_quantized = _as_int(v_quantized, "v_quantized")
    kv_len = _as_int(kv_len, "kv_len")
    if not 0 <= k_quantized <= keys.tokens:
        raise ValueError(f"k_quantized {k_quantized} must be in [0, {keys.tokens}] (the key codes' capacity)")
    if k_quantized % keys.group:
        raise ValueError(f"k_quantized {k_quantized} must be a multiple of the key group {keys.group}")
    if not 0 <= v_quantized <= values.tokens:
        raise ValueError(f"v_quantized {v_quantized} must be in [0, {values.tokens}] (the value codes' capacity)")
    for name, n_q, res in (("k", k_quantized, k_res), ("v", v_quantized, v_res)):
        if not n_q <= kv_len <= n_q + res.shape[2]:
            raise ValueError(f"kv_len {kv_len} must be in [{name}_quantized, {name}_quantized + {name}_res "
                             f"capacity] = [{n_q}, {n_q + res.shape[2]}]")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise ValueError(f"mask must be a tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != (B, kv_len):
            raise ValueError(f"mask must have shape [B, kv_len] = {(B, kv_len)}, got {_shape(mask)}")
        if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            raise ValueError(f"mask must be bool or floating point, got {mask.dtype}")
        if mask.device != dev:
            raise ValueError(f"mask must be on {dev}, got {mask.device}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    if softcap is None or not (float(softcap) >= 0.0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    _check_gear(k_gear, "k_gear", keys, B, Hkv, D, k_quantized, dev)
    _check_gear(v_gear, "v_gear", values, B, Hkv, Dv, v_quantized, dev)
    return k_quantized, v_quantized, kv_len


def supports(q: Tensor, keys: Quantized, values: Quantized, k_res: Tensor, v_res: Tensor) -> str | None:
    """None if the Triton kernel handles these inputs, else a short reason to fall back to the reference."""
    if not isinstance(q, Tensor) or q.dim() != 3:
        return "q must be [B, Hq, D]"
    if not isinstance(keys, Quantized) or not isinstance(values, Quantized):
        return "keys and values must be Quantized"
    D, Dv = q.shape[-1], values.head_dim
    for what, d in (("head_dim", D), ("value head_dim", Dv)):
        if not (_da._is_pow2(d) and _da._MIN_HEAD_DIM <= d <= _da._MAX_HEAD_DIM):
            return f"{what} {d} is not a power of two in [{_da._MIN_HEAD_DIM}, {_da._MAX_HEAD_DIM}]"
    if not _da._is_pow2(keys.group) or not _da._is_pow2(values.group):
        return f"groups must be powers of two, got keys {keys.group}, values {values.group}"
    if values.group < 32 // values.bits:
        return (f"value group {values.group} is below {32 // values.bits}, the {values.bits}-bit codes of one 32-bit "
                f"word (a word must not straddle two value groups)")
    if q.dtype not in _da._SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of fp16/bf16/fp32"
    if k_res.dtype != q.dtype or v_res.dtype != q.dtype:
        return f"residual dtypes {k_res.dtype}/{v_res.dtype} differ from q's {q.dtype}"
    if q.stride(-1) != 1 or k_res.stride(-1) != 1 or v_res.stride(-1) != 1:
        return "last dim of q and of the residual buffers must be contiguous"
    Hkv = keys.codes.shape[1]
    if Hkv == 0 or q.shape[1] % Hkv:
        return f"q heads ({q.shape[1]}) not a multiple of KV heads ({Hkv})"
    G = q.shape[1] // Hkv
    if max(16, triton.next_power_of_2(G)) * max(D, Dv) > _da._MAX_BLOCK_ELEMS:
        return f"group size {G} with head_dim {max(D, Dv)} is too large for one program"
    if q.device.type == "cuda":
        if q.dtype == torch.bfloat16 and _da._capability(q.device.index or 0)[0] < 8:
            return "bf16 needs compute capability >= 8.0"
        return None
    if q.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1" or _da.triton_interpreting():
            return None
        return "CPU tensors run the Triton kernel only under TRITON_INTERPRET=1"
    return f"device {q.device.type} is not supported"


_PROGRAMS_PER_SM = 16  # split-K target: a program holds ~1/2-1/3 of an SM, so 16 per SM is 5-8 waves (the last,
#                        partial wave costs at most ~1/6) while the partial outputs stay a few % of the codes' bytes
_MIN_TOKENS_PER_SPLIT = 512


def default_num_splits(batch: int, kv_heads: int, kv_len: int, sm_count: int | None) -> int:
    """Split-K heuristic: about _PROGRAMS_PER_SM programs per SM (more than the bf16 kernel's 2: a program
    here is ALU-heavy and long, so the last partial wave would idle much of the GPU), at least
    _MIN_TOKENS_PER_SPLIT tokens a split.  ``sm_count`` None (CPU/interpreter): decode_attention's rule."""
    if sm_count is None or kv_len <= 0:
        return _da.default_num_splits(batch, kv_heads, kv_len, sm_count)
    want = -(-(_PROGRAMS_PER_SM * sm_count) // max(1, batch * kv_heads))
    return max(1, min(want, kv_len // _MIN_TOKENS_PER_SPLIT, _da._MAX_SPLITS))


def _pow2_divisor(n: int) -> int:
    return n & -n


def _nonempty(t: Tensor) -> Tensor:
    """t, or a 1-element stand-in of its dtype when t holds nothing (the kernel never reads it then)."""
    return t if t.numel() else t.new_zeros((1,) * t.dim())


def kv_bytes(keys: Quantized, values: Quantized, k_res: Tensor, v_res: Tensor, *, k_quantized: int,
             v_quantized: int, kv_len: int, k_gear: GearTerms | None = None,
             v_gear: GearTerms | None = None) -> int:
    """Bytes a decode step reads for ``kv_len`` tokens: codes, scales, offsets, the residual tokens, GEAR terms."""
    total = keys.nbytes(k_quantized) + values.nbytes(v_quantized)
    total += k_res[:, :, : kv_len - k_quantized].numel() * k_res.element_size()
    total += v_res[:, :, : kv_len - v_quantized].numel() * v_res.element_size()
    if k_gear is not None:
        total += k_gear.nbytes(k_quantized, keys.group, "keys")
    if v_gear is not None:
        total += v_gear.nbytes(v_quantized, values.group, "values")
    return total


def quant_decode_attention(
    q: Tensor, keys: Quantized, values: Quantized, k_res: Tensor, v_res: Tensor, *,
    k_quantized: int, v_quantized: int, kv_len: int, mask: Tensor | None = None, scale: float | None = None,
    softcap: float = 0.0, num_splits: int | None = None, k_gear: GearTerms | None = None,
    v_gear: GearTerms | None = None,
) -> Tensor:  # [B, Hq, Dv] in q.dtype
    """Fused decode attention over a quantized cache (contract in the module docstring).

    q ``[B, Hq, D]`` (fp16/bf16/fp32, contiguous last dim); ``keys``/``values`` :class:`Quantized` with power-of-two
    groups; ``k_res``/``v_res`` in q's dtype with a contiguous last dim (other strides free); ``k_quantized`` (a
    multiple of the key group), ``v_quantized`` and ``kv_len`` host ints; ``mask`` None or ``[B, kv_len]`` bool
    (True = attend) or float additive; ``scale`` defaults to 1/sqrt(D); ``softcap`` > 0 applies ``softcap *
    tanh(s / softcap)`` before the mask; ``k_gear``/``v_gear`` GEAR terms (low-rank block a multiple of 16).
    Rows with every token masked get zeros.  Raises ValueError on malformed arguments or inputs the kernel does not
    support (:func:`supports`; callers fall back to :func:`quant_decode_attention_reference`).
    """
    k_quantized, v_quantized, kv_len = _check_inputs(q, keys, values, k_res, v_res, k_quantized, v_quantized,
                                                     kv_len, mask, scale, softcap, num_splits, k_gear, v_gear)
    reason = supports(q, keys, values, k_res, v_res)
    if reason is not None and not (q.device.type == "cpu" and reason.startswith("CPU tensors")):
        raise ValueError(f"quant_decode_attention cannot run these inputs: {reason}")

    B, Hq, D = q.shape
    Hkv = keys.codes.shape[1]
    Dv = values.head_dim
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    softcap = float(softcap)
    interpret = q.device.type != "cuda" or _da.triton_interpreting()
    fast = not interpret and q.dtype != torch.float32 and _asm_enabled()

    out = torch.empty((B, Hq, Dv), device=q.device, dtype=q.dtype)
    if B == 0 or Hq == 0:
        return out
    result = out
    if interpret and q.dtype == torch.bfloat16:
        # the interpreter's fp32 -> bf16 cast truncates; write fp32 and let torch round to nearest even
        out = torch.empty((B, Hq, Dv), device=q.device, dtype=torch.float32)

    k_lr = k_gear is not None and k_gear.lr_a is not None
    v_lr = v_gear is not None and v_gear.lr_a is not None
    lr_block = 0
    if k_lr or v_lr:
        blocks = {g.lr_block for g, on in ((k_gear, k_lr), (v_gear, v_lr)) if on}
        if len(blocks) > 1:
            raise ValueError(f"k_gear and v_gear must share one lr_block, got {sorted(blocks)}")
        lr_block = blocks.pop()
    lr_align = _pow2_divisor(lr_block) if lr_block else 0

    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, kv_len, None if interpret else _da._sm_count(q.device.index or 0))

    if mask is None:
        mask_kind, m_arg, stride_mb, stride_mn = 0, q, 0, 0
    else:
        mask_kind, m_arg = (1, mask.view(torch.uint8)) if mask.dtype == torch.bool else (2, mask)
        stride_mb, stride_mn = mask.stride()

    direct = num_splits == 1
    if direct:
        opart = lse = out  # unused
    else:
        opart = torch.empty((B, Hq, num_splits, Dv), device=q.device, dtype=torch.float32)
        lse = torch.empty((B, Hq, num_splits), device=q.device, dtype=torch.float32)

    dummy = q  # never dereferenced (its flag is off)
    z3 = (0, 0, 0)
    if k_lr:
        ka, kb, kseg = k_gear.lr_a, k_gear.lr_b, k_gear.lr_seg.expand(B, Hkv, k_gear.lr_seg.shape[2])
        ka_s, kb_s, kseg_s, rank_k = ka.stride()[:3], kb.stride()[:4], kseg.stride(), ka.shape[3]
    else:
        ka = kb = kseg = dummy
        ka_s, kb_s, kseg_s, rank_k = z3, (0, 0, 0, 0), z3, 0
    if v_lr:
        va, vb, vseg = v_gear.lr_a, v_gear.lr_b, v_gear.lr_seg.expand(B, Hkv, v_gear.lr_seg.shape[2])
        va_s, vb_s, vseg_s, rank_v = va.stride()[:3], vb.stride()[:4], vseg.stride(), va.shape[3]
    else:
        va = vb = vseg = dummy
        va_s, vb_s, vseg_s, rank_v = z3, (0, 0, 0, 0), z3, 0
    k_out = k_gear is not None and k_gear.out_idx is not None and k_gear.n_out > 0
    v_out = v_gear is not None and v_gear.out_idx is not None and v_gear.n_out > 0
    if k_out:
        koi, kov, koi_s, n_kout = k_gear.out_idx, k_gear.out_val, k_gear.out_idx.stride()[:4], k_gear.n_out
    else:
        koi = kov = dummy
        koi_s, n_kout = (0, 0, 0, 0), 0
    if v_out:
        voi, vov, voi_s, n_vout = v_gear.out_idx, v_gear.out_val, v_gear.out_idx.stride()[:3], v_gear.n_out
    else:
        voi = vov = dummy
        voi_s, n_vout = z3, 0

    # the codes as int16 lanes (little-endian: lane 2j + h is half h of word j, holding channel j * 2P + 2k + h in
    # its bits [k * bits, (k + 1) * bits))
    kc, ks, km = (_nonempty(t) for t in (keys.codes, keys.scale, keys.offset))
    vc, vs, vm = (_nonempty(t) for t in (values.codes, values.scale, values.offset))
    kc, vc = kc.view(torch.int16), vc.view(torch.int16)
    k_res, v_res = _nonempty(k_res), _nonempty(v_res)

    args = (
        q, kc, ks, km, vc, vs, vm, k_res, v_res, m_arg, out, opart, lse,
        ka, kb, kseg, koi, kov,
        va, vb, vseg, voi, vov,
        q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2),
        k_res.stride(0), k_res.stride(1), k_res.stride(2),
        v_res.stride(0), v_res.stride(1), v_res.stride(2),
        stride_mb, stride_mn,
        out.stride(0), out.stride(1),
        *ka_s, *kb_s, *kseg_s, *koi_s,
        *va_s, *vb_s, *vseg_s, *voi_s,
        k_quantized, v_quantized, kv_len, num_splits, Hkv, max(lr_block, 1), rank_k, rank_v,
        scale, softcap if softcap > 0 else 1.0, _da._tune_bucket(kv_len, num_splits),
    )
    meta = dict(
        QGROUP=G, BLOCK_G=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, HEAD_DV=Dv,
        K_BITS=keys.bits, V_BITS=values.bits, FAST=fast,
        K_ASM=_asm_dequant(keys.bits), V_ASM=_asm_dequant(values.bits),
        K_GROUP=keys.group, V_GROUP=values.group,
        MASK_KIND=mask_kind, HAS_SOFTCAP=softcap > 0, DOT_FP32=interpret or q.dtype == torch.float32,
        DIRECT_OUT=direct, K_LOWRANK=k_lr, V_LOWRANK=v_lr, K_OUTLIERS=n_kout, V_OUTLIERS=n_vout,
        RANK_PAD=_RANK_PAD, LR_ALIGN=lr_align,
    )
    grid = (B * Hkv * num_splits,)
    if _use_planes(keys, values, D, Dv, G, k_gear is not None or v_gear is not None, interpret):
        g_p2 = triton.next_power_of_2(G)
        k_rot, k_pos = _key_plane_table(keys.bits)
        meta.update(QGROUP_P2=g_p2, K_CASM=_KEY_CODES_ASM, K_ROT=k_rot, K_POS=k_pos,
                    V_ASM_BYTES=_asm_dequant_bytes(values.bits) if values.bits < 8 else "")
        if interpret:
            bn, tn = _INTERPRET_CONFIG["BLOCK_N"], _INTERPRET_TAIL_N  # (a tail tile smaller than the bulk's)
            chunk = -(-(-(-kv_len // num_splits)) // bn) * bn
            n_bulk = min(k_quantized, v_quantized) // bn * bn
            _da._interpreted(_quant_plane_kernel)[grid](
                *args, **meta, STATIC=True, STATIC_BULK=-(-min(chunk, n_bulk) // bn),
                STATIC_TAIL=-(-min(chunk, kv_len - n_bulk) // tn), VALUE_N=_INTERPRET_VALUE_N, TAIL_N=tn,
                **_INTERPRET_CONFIG)
        elif _da._autotune_enabled():
            _PLANE_TUNED[grid](*args, **meta, STATIC=False, STATIC_BULK=0, STATIC_TAIL=0, TAIL_N=_PLANE_TAIL_N)
        else:
            _PLANE_JIT[grid](*args, **meta, STATIC=False, STATIC_BULK=0, STATIC_TAIL=0, TAIL_N=_PLANE_TAIL_N,
                             **_plane_fixed_config(keys.group, g_p2))
    elif interpret:
        config = dict(_INTERPRET_CONFIG)
        bn = config["BLOCK_N"] = min(config["BLOCK_N"], lr_align or config["BLOCK_N"])
        chunk = -(-(-(-kv_len // num_splits)) // bn) * bn
        n_bulk = min(k_quantized, v_quantized) // bn * bn
        _da._interpreted(_quant_split_kernel)[grid](
            *args, **meta, STATIC=True, STATIC_BULK=-(-min(chunk, n_bulk) // bn),
            STATIC_TAIL=-(-min(chunk, kv_len - n_bulk) // bn), **config)
    elif _da._autotune_enabled():
        _SPLIT_TUNED[grid](*args, **meta, STATIC=False, STATIC_BULK=0, STATIC_TAIL=0)
    else:
        config = dict(_FIXED_GPU_CONFIG)
        config["BLOCK_N"] = min(config["BLOCK_N"], lr_align or config["BLOCK_N"])
        _SPLIT_JIT[grid](*args, **meta, STATIC=False, STATIC_BULK=0, STATIC_TAIL=0, **config)

    if not direct:
        _da.combine_partials(opart, lse, out, interpret=interpret)
    if out is not result:
        result.copy_(out)
    return result
