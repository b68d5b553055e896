"""Decode attention over a ragged head-wise KV layout with one compensation token per head (RazorAttention).

The KV heads of one layer keep different numbers of tokens (retrieval heads everything, the others sinks + a recent
window), so they share one flat slot buffer per row, each head owning a region of it::

    q: [B, Hq, D]            k: [B, N, D]   v: [B, N, Dv]   pos: [B, N] int64 (a slot's token position)
    offsets: [Hkv] int64     lengths: [B, Hkv] int64        slots offsets[j] .. offsets[j] + lengths[b, j] - 1
                                                           are KV head j's in row b
    comp_k: [B, Hkv, D]      comp_v: [B, Hkv, Dv]           comp_n: [B, Hkv] float32 (N_d; 0 = no compensation)

Query head h attends, with its KV head j = h // G, to

    x[s] = scale * q[b, h] . k[b, s] + bias(s)              for the slots s of head j in row b
    x_c  = scale * q[b, h] . comp_k[b, j] + log(N_d)        if N_d = comp_n[b, j] > 0

(softcap, if any, applies to the scaled dot products before the biases), and the output is
softmax([x, x_c]) @ [v[b, s], comp_v[b, j]]: the compensation token stands for the N_d dropped tokens as N_d
identical copies of their mean key and value. bias(s) is read from the mask row at the slot's position as in
kvfx.kernels.slot_decode (``row[b, h, pos - mask_offset]``, bool True = attend, float additive, entries
<= ``masked_below`` and positions before the row not attended; no row: 0).

Tensors in, tensors out. :func:`ragged_decode_attention_reference` is the float32 torch ground truth (and CPU path).

Kernel design (:func:`ragged_decode_attention`): split-K as kvfx.kernels.scored_decode_attention
-----------------------------------------------------------------------------------------------
* Split kernel, grid ``(B * Hkv * num_splits,)``: one program per (batch row, KV head, split) loads the G query heads
  of its group as one ``[BLOCK_G, D]`` block (G padded to >= 16 rows for ``tl.dot``) and streams its chunk of the
  head's region (``offsets[j]`` onwards in the row, ``lengths[b, j]`` slots) in blocks of ``BLOCK_N`` slots with an
  exp2 online softmax.  Every split covers ``ceil(max_length / num_splits)`` slots rounded up to ``BLOCK_N`` and
  stops at its head's length, so a short head's later splits do no work.  Split 0 of each (row, head) starts its
  softmax with the compensation token (logit ``x_c``, value ``comp_v``) instead of an empty state.  Each split
  writes a normalised float32 partial output and its log2-sum-exp; with one split the final output directly.
* Merge (several splits only): kvfx.kernels.decode_attention.combine_partials, one program per (row, query head)
  that loads the splits' partial outputs in chunks of 16 (a serial load per split made the merge of a 27-split
  retrieval head a chain of 27 memory latencies).
* ``max_length`` is a host-side int bounding ``lengths`` (no device sync to find it): it only sizes the splits.
  Slots of a head past ``num_splits`` chunks of it are never read, so it must really bound every length (checked for
  CPU tensors; on the GPU a larger length is cut short).  Regions are clipped to the row's ``N`` slots, mask columns
  past the row's end read its last column (as the reference).
* A query head with nothing to attend (an empty head: length 0 and comp_n 0, or every slot masked) gets a zero
  output here (the reference gives NaN).
* One fixed launch configuration per device kind (no autotuning); CPU tensors run the same kernels under the Triton
  interpreter.
"""

from __future__ import annotations

import math
import operator
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from kvfx.kernels import decode_attention as _da

__all__ = ["ragged_decode_attention", "ragged_decode_attention_reference", "supports"]

_MAX = _da._MAX  # tl.reduce combine functions (see kvfx.kernels.decode_attention)
_SUM = _da._SUM


def ragged_decode_attention_reference(
    q: Tensor,  # [B, Hq, D]
    k: Tensor,  # [B, N, D]
    v: Tensor,  # [B, N, Dv]
    pos: Tensor,  # [B, N] int64
    offsets: Tensor,  # [Hkv] int64
    lengths: Tensor,  # [B, Hkv] int64
    comp_k: Tensor,  # [B, Hkv, D]
    comp_v: Tensor,  # [B, Hkv, Dv]
    comp_n: Tensor,  # [B, Hkv] float32
    *,
    scale: float,
    softcap: float = 0.0,
    mask_row: Tensor | None = None,  # [B|1, 1|Hq, Tk]
    mask_offset: int = 0,
    masked_below: float = -math.inf,
) -> Tensor:  # [B, Hq, Dv] in q.dtype
    b, hq, _ = q.shape
    hkv = offsets.shape[0]
    group = hq // hkv
    out = torch.empty(b, hq, v.shape[-1], dtype=torch.float32, device=q.device)
    for row in range(b):
        for j in range(hkv):
            start, n = int(offsets[j]), int(lengths[row, j])
            keys = torch.cat([k[row, start:start + n].float(), comp_k[row, j, None].float()])  # [n + 1, D]
            values = torch.cat([v[row, start:start + n].float(), comp_v[row, j, None].float()])
            positions = pos[row, start:start + n]
            for h in range(j * group, (j + 1) * group):
                x = keys @ q[row, h].float() * scale  # [n + 1]
                if softcap:
                    x = torch.tanh(x / softcap) * softcap
                bias = torch.zeros(n + 1, device=q.device)
                if mask_row is not None:
                    entries = mask_row[row if mask_row.shape[0] > 1 else 0, h if mask_row.shape[1] > 1 else 0]
                    column = positions - mask_offset
                    seen = (column >= 0) & (positions >= 0)
                    picked = entries[column.clamp(0, entries.shape[0] - 1)]
                    if entries.dtype == torch.bool:
                        bias[:n] = torch.where(seen & picked, 0.0, -math.inf)
                    else:
                        picked = picked.float()
                        bias[:n] = torch.where(seen & (picked > masked_below), picked, -math.inf)
                else:
                    bias[:n] = torch.where(positions >= 0, 0.0, -math.inf)
                count = float(comp_n[row, j])
                bias[n] = math.log(count) if count > 0 else -math.inf
                probs = torch.softmax(x + bias, dim=0)
                out[row, h] = probs @ values
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------
# Triton kernels.  House rules of kvfx.kernels.decode_attention: plain functions wrapped
# as compiled and interpreted variants, no triton.language.standard @jit helpers in the
# bodies (reductions through tl.reduce with the standard combine functions), constexpr
# trip counts under the interpreter.
# --------------------------------------------------------------------------------------


def _ragged_split_kernel(
    Q, K, V, Pos, Offsets, Lengths, CompK, CompV, CompN, Mask, O, Opart, Lse,
    stride_qb, stride_qh,
    stride_kb, stride_kn,
    stride_vb, stride_vn,
    stride_pb, stride_pn,
    stride_lb, stride_lh,
    stride_ckb, stride_ckh, stride_ckd,
    stride_cvb, stride_cvh, stride_cvd,
    stride_nb, stride_nh,
    stride_mb, stride_mh, stride_mn,
    stride_ob, stride_oh,
    N, max_length, num_splits, Hkv, Tk, mask_offset,
    sm_scale, softcap, masked_below,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 no mask, 1 bool (uint8, 0 = masked), 2 additive float
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DIRECT_OUT: tl.constexpr,  # num_splits == 1: write the final output in O's dtype
    STATIC_ITERS: tl.constexpr,  # > 0 (interpreter only): fixed trip count
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    split = pid % num_splits
    bh = pid // num_splits
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DV)
    offs_n = tl.arange(0, BLOCK_N)
    g_valid = offs_g < GROUP
    hq = hk * GROUP + offs_g  # query heads of this group (int64)
    row = b * (Hkv * GROUP) + hq  # rows of [B, Hq, ...] buffers

    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + offs_d[None, :], mask=g_valid[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # the head's region of the row: slots offset .. offset + length - 1 (clipped to the row's N slots)
    offset = tl.load(Offsets + hk).to(tl.int64)
    length = tl.load(Lengths + b * stride_lb + hk * stride_lh).to(tl.int64)
    length = tl.maximum(tl.minimum(length, N - offset), 0)
    per_split = (max_length + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, length)

    k_base = K + b * stride_kb + offset * stride_kn
    v_base = V + b * stride_vb + offset * stride_vn
    p_base = Pos + b * stride_pb + offset * stride_pn
    if MASK_KIND != 0:
        mask_rows = Mask + b * stride_mb + hq * stride_mh  # [BLOCK_G] pointers (stride_mh may be 0)

    # the compensation token: split 0 starts its softmax with it (one entry of weight 1 at logit x_c)
    cn = tl.load(CompN + b * stride_nb + hk * stride_nh).to(tl.float32)
    ck = tl.load(CompK + b * stride_ckb + hk * stride_ckh + offs_d * stride_ckd).to(tl.float32)
    cv = tl.load(CompV + b * stride_cvb + hk * stride_cvh + offs_dv * stride_cvd).to(tl.float32)
    xc = tl.reduce(q.to(tl.float32) * ck[None, :], 1, _SUM) * sm_scale  # [BLOCK_G]
    if HAS_SOFTCAP:
        # softcap * tanh(xc / softcap) from exp2 (no libdevice), odd Taylor series near 0
        # (own names: the loop below reuses x, th, ... with other shapes)
        cx = xc / softcap
        cax = tl.abs(cx)
        ce = tl.exp2(cax * (-2.0 * LOG2E))
        cx2 = cx * cx
        cth_small = cax * (1.0 + cx2 * (-1.0 / 3.0 + cx2 * (2.0 / 15.0 + cx2 * (-17.0 / 315.0))))
        cth = tl.where(cax < 0.125, cth_small, (1.0 - ce) / (1.0 + ce))
        xc = softcap * tl.where(cx < 0, -cth, cth)
    xc = xc * LOG2E + tl.log2(tl.where(cn > 0.0, cn, 1.0))  # + log(N_d), in log2 units
    has_comp = (cn > 0.0) & (split == 0)  # a scalar
    l_i = tl.where(g_valid, tl.where(has_comp, 1.0, 0.0), 0.0)  # [BLOCK_G]: the token's weight
    m_i = tl.where(l_i > 0.0, xc, float("-inf"))
    acc = l_i[:, None] * cv[None, :]  # [BLOCK_G, HEAD_DV] float32

    for it in range(0, STATIC_ITERS if STATIC_ITERS > 0 else
                    ((tl.maximum(end - start, 0) + BLOCK_N - 1) // BLOCK_N).to(tl.int32)):
        cols = start + it * BLOCK_N + offs_n  # int64, relative to the region's start
        n_valid = cols < end
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :], mask=n_valid[:, None], other=0.0)
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * sm_scale
        if HAS_SOFTCAP:
            x = s / softcap
            ax = tl.abs(x)
            e = tl.exp2(ax * (-2.0 * LOG2E))
            th_big = (1.0 - e) / (1.0 + e)
            x2 = x * x
            th_small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
            th = tl.where(ax < 0.125, th_small, th_big)
            s = softcap * tl.where(x < 0, -th, th)
        # empty slots (pos < 0) are not attended; with a mask row neither are positions before its first column,
        # the others read it at their position: column pos - mask_offset of each query head's row (past its end:
        # the last column)
        kp = tl.load(p_base + cols * stride_pn, mask=n_valid, other=-1).to(tl.int64)
        if MASK_KIND == 0:
            s = s + tl.where((kp >= 0) & n_valid, 0.0, float("-inf"))[None, :]
        else:
            column = kp - mask_offset
            present = (kp >= 0) & (column >= 0) & n_valid
            column = tl.minimum(column, Tk - 1)
            mv = tl.load(mask_rows[:, None] + column[None, :] * stride_mn,
                         mask=g_valid[:, None] & present[None, :], other=0)
            if MASK_KIND == 1:
                add = tl.where(mv != 0, 0.0, float("-inf"))
            else:
                mv = mv.to(tl.float32)
                add = tl.where(mv > masked_below, mv, float("-inf"))
            s = s + tl.where(present[None, :], add, float("-inf"))
        s = tl.where(n_valid[None, :], s * LOG2E, float("-inf"))  # the logits, in log2 units

        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = acc * alpha[:, None]
        if DOT_FP32:
            acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # l == 0 only if nothing was attended: acc == 0, a zero output
    out = acc / l_safe[:, None]
    if DIRECT_OUT:
        o_ptrs = O + b * stride_ob + hq[:, None] * stride_oh + offs_dv[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=g_valid[:, None])
    else:
        # Lse: [B, Hq, num_splits] float32 (log2 units); Opart: [B, Hq, num_splits, Dv] float32, contiguous
        # a split past its head's end (most of a short head's splits) writes only lse = -inf: the merge skips it
        part = row * num_splits + split
        tl.store(Lse + part, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=g_valid)
        work = tl.zeros([BLOCK_G], tl.int32) + (end > start).to(tl.int32) + has_comp.to(tl.int32)
        written = g_valid & (work > 0)  # slots or the compensation token
        tl.store(Opart + part[:, None] * HEAD_DV + offs_dv[None, :], out, mask=written[:, None])


# Runtime ints that vary per call are not specialised (no recompiles as lengths, split counts or offsets change).
_SPLIT_JIT = JITFunction(_ragged_split_kernel, do_not_specialize=["N", "max_length", "num_splits", "Hkv", "Tk",
                                                                  "mask_offset"])


def _smem_bytes(block_n: int, head_dim: int, head_dv: int, elem_size: int, stages: int) -> int:
    return max(stages, 1) * block_n * (head_dim + head_dv) * elem_size


def _fixed_gpu_config(head_dim: int, head_dv: int, elem_size: int) -> dict:
    for block_n, stages in ((64, 2), (32, 2), (16, 2)):
        if _smem_bytes(block_n, head_dim, head_dv, elem_size, stages) <= _da._SMEM_BUDGET:
            return dict(BLOCK_N=block_n, num_warps=4, num_stages=stages)
    return dict(BLOCK_N=16, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def supports(q, k, v, *, kv_heads: int | None = None) -> str | None:
    """None if the Triton kernel handles these tensors, else a short reason to fall back to the reference.

    q ``[B, Hq, D]``, k ``[B, N, D]``, v ``[B, N, Dv]``; ``kv_heads`` (the number of KV heads, ``offsets``'
    length), when given, is checked as well."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (q, k, v)):
        return "q must be [B, Hq, D], k [B, N, D] and v [B, N, Dv]"
    D, Dv = q.shape[-1], v.shape[-1]
    for what, d in (("head_dim", D), ("value head_dim", Dv)):
        if not (_da._is_pow2(d) and _da._MIN_HEAD_DIM <= d <= _da._MAX_HEAD_DIM):
            return f"{what} {d} is not a power of two in [{_da._MIN_HEAD_DIM}, {_da._MAX_HEAD_DIM}]"
    if k.shape[-1] != D:
        return f"k head_dim {k.shape[-1]} != q head_dim {D}"
    if q.dtype not in _da._SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of fp16/bf16/fp32"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"k/v dtype {k.dtype}/{v.dtype} differs from q dtype {q.dtype}"
    if kv_heads is not None:
        Hq = q.shape[1]
        if kv_heads <= 0 or Hq % kv_heads != 0:
            return f"q heads ({Hq}) not a multiple of KV heads ({kv_heads})"
        G = Hq // kv_heads
        if max(16, triton.next_power_of_2(G)) * max(D, Dv) > _da._MAX_BLOCK_ELEMS:
            return f"group size {G} with head_dim {max(D, Dv)} is too large for one program"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "last dim of q/k/v must be contiguous"
    if q.device.type == "cuda":
        if q.dtype == torch.bfloat16 and _da._capability(q.device.index or 0)[0] < 8:
            return "bf16 needs compute capability >= 8.0"
        return None
    if q.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1" or _da.triton_interpreting():
            return None
        return "CPU tensors run the Triton kernel only under TRITON_INTERPRET=1"
    return f"device {q.device.type} is not supported"


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ()))


def _typed_view(t, name: str, shape: tuple, device, *, kinds: str) -> Tensor:
    """``t`` expanded to ``shape`` after checking its type (kinds: "int", "float" or "number") and device."""
    ints = (torch.int32, torch.int64)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    ok = {"int": t.dtype in ints, "float": t.dtype in _da._SUPPORTED_DTYPES,
          "number": t.dtype in ints or t.dtype.is_floating_point}[kinds]
    if not ok:
        want = {"int": "an int32/int64", "float": "a float16/bfloat16/float32", "number": "a float or int32/int64"}
        raise ValueError(f"{name} must be {want[kinds]} tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if t.dim() > len(shape):
        raise ValueError(f"{name} must be broadcastable to {list(shape)}, got {list(t.shape)}")
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} must be broadcastable to {list(shape)}, got {list(t.shape)}") from None


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a Python int, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__}") from None


def _check_inputs(q, k, v, pos, offsets, lengths, comp_k, comp_v, comp_n, scale, softcap, mask_row, mask_offset,
                  masked_below, max_length, num_splits):
    """Validate arguments; returns (pos, lengths, comp_k, comp_v, comp_n, mask_row) broadcast to their full shapes
    (mask_row [B, Hq, Tk] or None), mask_offset and max_length as ints."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [B, Hq, D] tensor, got shape {_shape(q)}")
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        raise ValueError(f"k must be a [B, N, D] tensor, got shape {_shape(k)}")
    if not isinstance(v, torch.Tensor) or v.dim() != 3 or tuple(v.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"v must be [B, N, Dv] with k's first two dims {tuple(k.shape[:2])}, got {_shape(v)}")
    B, Hq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k batch size {k.shape[0]} does not match q batch size {B}")
    if k.shape[2] != D:
        raise ValueError(f"k head_dim {k.shape[2]} does not match q head_dim {D}")
    N, Dv = k.shape[1], v.shape[2]
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    dev = q.device
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.shape[0] == 0:
        raise ValueError(f"offsets must be a non-empty [Hkv] tensor, got shape {_shape(offsets)}")
    offsets = _typed_view(offsets, "offsets", tuple(offsets.shape), dev, kinds="int")
    Hkv = offsets.shape[0]
    if Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of the KV heads ({Hkv}, the length of offsets)")
    pos = _typed_view(pos, "pos", (B, N), dev, kinds="int")
    lengths = _typed_view(lengths, "lengths", (B, Hkv), dev, kinds="int")
    comp_k = _typed_view(comp_k, "comp_k", (B, Hkv, D), dev, kinds="float")
    comp_v = _typed_view(comp_v, "comp_v", (B, Hkv, Dv), dev, kinds="float")
    comp_n = _typed_view(comp_n, "comp_n", (B, Hkv), dev, kinds="number")
    if mask_row is not None:
        if not isinstance(mask_row, torch.Tensor) or not (mask_row.dtype == torch.bool or mask_row.dtype in
                                                          _da._SUPPORTED_DTYPES):
            raise ValueError(f"mask_row must be a bool or float16/bfloat16/float32 tensor or None, "
                             f"got {getattr(mask_row, 'dtype', type(mask_row).__name__)}")
        if mask_row.device != dev:
            raise ValueError(f"mask_row must be on {dev}, got {mask_row.device}")
        if mask_row.dim() != 3 or mask_row.shape[0] not in (1, B) or mask_row.shape[1] not in (1, Hq) \
                or mask_row.shape[2] == 0:
            raise ValueError(f"mask_row must be [B|1, 1|Hq, Tk] = [{B}|1, 1|{Hq}, Tk >= 1], got {_shape(mask_row)}")
        mask_row = mask_row.expand(B, Hq, mask_row.shape[2])
    mask_offset = _as_int(mask_offset, "mask_offset")
    if math.isnan(float(masked_below)):
        raise ValueError("masked_below must not be NaN")
    max_length = _as_int(max_length, "max_length")
    if max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    if softcap is None or not (float(softcap) >= 0.0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if dev.type == "cpu" and B > 0:  # the layout itself: free to check here, a device sync on the GPU
        if (offsets < 0).any() or (lengths < 0).any() or (offsets.view(1, Hkv) + lengths > N).any():
            raise ValueError(f"the heads' regions offsets[j] .. offsets[j] + lengths[b, j] must lie in the row's "
                             f"{N} slots, got offsets {offsets.tolist()} and lengths {lengths.tolist()}")
        if (lengths > max_length).any():
            raise ValueError(f"max_length {max_length} is below the longest head ({int(lengths.max())} slots)")
    return pos, lengths, comp_k, comp_v, comp_n, mask_row, mask_offset, max_length


_SPLIT_SLOTS_MIN = 256  # slots a split reads at least
_WAVES = 4  # split programs per SM the layout's work is spread over (benchmarks/results/ragged_sweep_h100.txt)
_MAX_RAGGED_SPLITS = 128


def _balanced_splits(batch: int, slots: int, max_length: int, sm_count: int | None, kv_heads: int) -> int:
    """Split count from the whole layout's work, not the longest head's: heads differ in length (a retrieval head
    can be 5x the others), so each split gets about ``batch * slots / (_WAVES * SMs)`` slots and a long head many
    splits, while the splits past a short head's end exit at once. CPU/interpreter: decode_attention's rule."""
    if sm_count is None or max_length <= 0:
        return _da.default_num_splits(batch, kv_heads, max_length, sm_count)
    chunk = max(_SPLIT_SLOTS_MIN, -(-batch * slots // (_WAVES * sm_count)))
    return max(1, min(-(-max_length // chunk), _MAX_RAGGED_SPLITS))


def ragged_decode_attention(
    q: Tensor,  # [B, Hq, D]
    k: Tensor,  # [B, N, D]
    v: Tensor,  # [B, N, Dv]
    pos: Tensor,  # [B, N] int
    offsets: Tensor,  # [Hkv] int
    lengths: Tensor,  # [B, Hkv] int
    comp_k: Tensor,  # [B, Hkv, D]
    comp_v: Tensor,  # [B, Hkv, Dv]
    comp_n: Tensor,  # [B, Hkv] float
    *,
    scale: float,
    softcap: float = 0.0,
    mask_row: Tensor | None = None,  # [B|1, 1|Hq, Tk] bool or float
    mask_offset: int = 0,
    masked_below: float = -math.inf,
    max_length: int,
    num_splits: int | None = None,
) -> Tensor:  # [B, Hq, Dv] in q.dtype
    """Fused decode attention over the ragged layout: :func:`ragged_decode_attention_reference` (arguments alike).

    ``max_length`` is a host-side int >= every ``lengths[b, j]`` (it sizes the splits; the kernel never syncs
    with the device to find it); ``num_splits`` None picks :func:`kvfx.kernels.decode_attention.default_num_splits`.
    q, k and v need q's dtype (fp16/bf16/fp32) and a contiguous last dim, other strides are free; pos, lengths,
    comp_* and the mask row may have any strides and broadcast (stride 0 included); comp_k/comp_v may be any of
    fp16/bf16/fp32, comp_n float or int.  A query head with nothing to attend (its KV head empty: length 0 and
    comp_n 0, or every entry masked) gets a zero output (the reference: NaN).  Raises ValueError on malformed
    arguments or inputs the kernel does not support (:func:`supports`; callers fall back to the reference).
    """
    pos, lengths, comp_k, comp_v, comp_n, mask_row, mask_offset, max_length = _check_inputs(
        q, k, v, pos, offsets, lengths, comp_k, comp_v, comp_n, scale, softcap, mask_row, mask_offset,
        masked_below, max_length, num_splits)
    Hkv = offsets.shape[0]
    reason = supports(q, k, v, kv_heads=Hkv)
    if reason is not None and not (q.device.type == "cpu" and reason.startswith("CPU tensors")):
        raise ValueError(f"ragged_decode_attention cannot run these inputs: {reason}")

    B, Hq, D = q.shape
    N, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    softcap = float(softcap)
    interpret = q.device.type != "cuda" or _da.triton_interpreting()

    out = torch.empty((B, Hq, Dv), device=q.device, dtype=q.dtype)
    if B == 0 or Hq == 0:
        return out
    result = out
    if interpret and q.dtype == torch.bfloat16:
        # the interpreter's fp32 -> bf16 cast truncates; write fp32 and let torch round to nearest even
        out = torch.empty((B, Hq, Dv), device=q.device, dtype=torch.float32)
    if N == 0:  # no slot to read (every length is clipped to 0): point the kernel at q, never dereferenced
        k, v, pos = q, q, q.new_zeros(1, dtype=torch.int64).expand(B, 1)

    config = dict(_da._INTERPRET_CONFIG) if interpret else _fixed_gpu_config(D, Dv, q.element_size())
    block_n = config["BLOCK_N"]
    if num_splits is None:
        num_splits = _balanced_splits(B, N, max_length, None if interpret else _da._sm_count(q.device.index or 0),
                                      Hkv)
    if max_length == 0:
        num_splits = 1
    else:  # drop the splits that start past max_length (chunks are rounded up to BLOCK_N)
        chunk = -(-(-(-max_length // num_splits)) // block_n) * block_n
        num_splits = -(-max_length // chunk)
    direct = num_splits == 1

    if direct:
        opart = lse = out  # unused
    else:
        opart = torch.empty((B, Hq, num_splits, Dv), device=q.device, dtype=torch.float32)
        lse = torch.empty((B, Hq, num_splits), device=q.device, dtype=torch.float32)
    if mask_row is None:
        mask_kind, mask, mask_strides, tk = 0, q, (0, 0, 0), 1
    else:
        mask_kind = 1 if mask_row.dtype == torch.bool else 2
        mask = mask_row.view(torch.uint8) if mask_row.dtype == torch.bool else mask_row
        mask_strides, tk = mask.stride(), mask.shape[2]

    args = (
        q, k, v, pos, offsets, lengths, comp_k, comp_v, comp_n, mask, out, opart, lse,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        pos.stride(0), pos.stride(1),
        lengths.stride(0), lengths.stride(1),
        *comp_k.stride(),
        *comp_v.stride(),
        comp_n.stride(0), comp_n.stride(1),
        *mask_strides,
        out.stride(0), out.stride(1),
        N, max_length, num_splits, Hkv, tk, mask_offset,
        float(scale), softcap if softcap > 0 else 1.0, float(masked_below),
    )
    meta = dict(
        GROUP=G, BLOCK_G=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, HEAD_DV=Dv, MASK_KIND=mask_kind,
        HAS_SOFTCAP=softcap > 0, DOT_FP32=interpret or q.dtype == torch.float32, DIRECT_OUT=direct,
    )
    grid = (B * Hkv * num_splits,)
    if interpret:
        iters = max(-(-(-(-max_length // num_splits)) // block_n), 1)
        _da._interpreted(_ragged_split_kernel)[grid](*args, **meta, STATIC_ITERS=iters, **config)
    else:
        _SPLIT_JIT[grid](*args, **meta, STATIC_ITERS=0, **config)

    if not direct:
        _da.combine_partials(opart, lse, out, interpret=interpret)
    if out is not result:
        result.copy_(out)
    return result
