"""Column sums of prefill attention probabilities: how much attention each prompt key received (H2O, Keyformer,
SnapKV), without materialising the [Tq, Tk] matrix on the GPU.

    q: [B, Hq, Tq, D]   (the last Tq of Tk positions: query i sits at position Tk - Tq + i)
    k: [B, Hkv, Tk, D]
    x[b, h, i, j] = softcap(scale * q . k) + mask           (mask: bool (False = masked) or additive float,
                                                               broadcastable to [B, Hq, Tq, Tk])
                    -inf where causal and j > Tk - Tq + i, or where valid[b, j] is False
    y = x, or (x + g) / tau with Keyformer's Gumbel noise g at (seed, layer, b, h, Tk - Tq + i, j)
    score[b, j_kv, j] = sum over queries i with valid[b, Tk - Tq + i], and over the G query heads of KV head j_kv,
                        of softmax_j(y[b, h, i])[j]          (float32; a row with no attendable key adds nothing)

Tensors in, tensors out.

Kernel design (:func:`attention_column_scores`): two passes over the keys, nothing of size [Tq, Tk] in memory
----------------------------------------------------------------------------------------------------------------
* Rows: the G query heads of a KV head are interleaved into one axis of G * Tq rows (row t = query t // G of head
  t % G), so every K tile serves the whole group, and a mask broadcast over heads is read once per query position.
* Pass 1, grid ``(row blocks * splits, B * Hkv)``: flash-style over key tiles, each row's log2-sum-exp of y (with the
  Gumbel noise hashed in the kernel); causal row blocks stop at their last query's position.  With few rows (e.g.
  SnapKV's 32-query window) the keys are split over programs and the partial log-sum-exps kept per split.
* Pass 2, grid ``(key blocks, B * Hkv)``: a key tile stays put while the group's query rows stream by (causal: from
  the first row that can see it); the logits are recomputed, ``exp2(y - lse)`` summed elementwise into a
  [rows, keys] register tile (rows of invalid positions and rows with no attendable key masked out) and reduced over
  rows once at the end.  Deterministic: no atomics.
* CUDA: both passes autotuned (``KVFX_DECODE_AUTOTUNE=0`` selects a fixed configuration); CPU tensors run the same
  kernels under the Triton interpreter.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from kvfx.kernels import decode_attention as _da
from kvfx.kernels.gumbel import gumbel_noise, gumbel_noise_reference, gumbel_row_key
from kvfx.kernels.scored_decode_attention import GumbelScores

__all__ = ["attention_column_scores", "attention_column_scores_reference", "supports"]

_MAX = _da._MAX  # tl.reduce combine functions (see kvfx.kernels.decode_attention)
_SUM = _da._SUM

_ROWS_PER_CHUNK = 256  # bounds the reference's memory to [B, Hq, 256, Tk] floats


def attention_column_scores_reference(
    q: torch.Tensor,  # [B, Hq, Tq, D]
    k: torch.Tensor,  # [B, Hkv, Tk, D]
    *,
    scale: float,
    mask: torch.Tensor | None = None,  # broadcastable to [B, Hq, Tq, Tk]
    causal: bool = False,
    valid: torch.Tensor | None = None,  # [B, Tk] bool: False = a padding position (never attended nor attending)
    softcap: float = 0.0,
    gumbel: GumbelScores | None = None,
) -> torch.Tensor:  # [B, Hkv, Tk] float32
    """The fp32 torch reference (and CPU path), chunked over query rows."""
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    kf = k.float().repeat_interleave(group, dim=1)  # [B, Hq, Tk, D]
    keys = torch.arange(tk, device=q.device)
    total = torch.zeros(b, hq, tk, dtype=torch.float32, device=q.device)
    for start in range(0, tq, _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, tq)
        qpos = torch.arange(tk - tq + start, tk - tq + stop, device=q.device)  # [R]
        x = torch.einsum("bhid,bhjd->bhij", q[:, :, start:stop].float(), kf) * scale  # [B, Hq, R, Tk]
        if softcap:
            x = torch.tanh(x / softcap) * softcap
        if mask is not None:
            part = mask.expand(b, hq, tq, tk)[:, :, start:stop] if mask.dim() == 4 else mask
            x = x.masked_fill(~part, float("-inf")) if part.dtype == torch.bool else x + part.float()
        blocked = torch.zeros(1, 1, stop - start, tk, dtype=torch.bool, device=q.device)
        if causal:
            blocked = blocked | (keys.view(1, 1, 1, tk) > qpos.view(1, 1, -1, 1))
        if valid is not None:
            blocked = blocked | ~valid.view(b, 1, 1, tk)
        x = x.masked_fill(blocked, float("-inf"))
        if gumbel is not None:
            rows = torch.arange(b, device=q.device).view(b, 1, 1, 1)
            heads = torch.arange(hq, device=q.device).view(1, hq, 1, 1)
            noise = gumbel_noise_reference(gumbel.seed, gumbel.layer, rows, heads, qpos.view(1, 1, -1, 1),
                                           keys.view(1, 1, 1, tk))
            x = (x + noise.to(x.device)) / gumbel.tau
        top = x.amax(dim=-1, keepdim=True)
        probs = torch.exp(x - top.clamp_min(torch.finfo(torch.float32).min))  # an all -inf row stays 0, not NaN
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        if valid is not None:
            probs = probs * valid[:, qpos].view(b, 1, -1, 1)
        total += probs.sum(dim=2)
    return total.view(b, hkv, group, tk).sum(dim=2)


# --------------------------------------------------------------------------------------
# Triton kernels (house rules of kvfx.kernels.decode_attention: plain functions wrapped as
# compiled and interpreted variants, no triton.language.standard @jit helpers in the
# bodies, constexpr trip counts under the interpreter).
#
# Rows.  The G query heads of a KV head are interleaved into one row axis of G * Tq rows,
# row t = i * G + g (query i, head hk * G + g), so one K tile serves the whole group
# (GQA-native) and the rows of one block share their query positions: causal limits stay
# tight and a mask broadcast over heads is read once per position, not once per head.
# --------------------------------------------------------------------------------------


def _colscore_lse_kernel(
    Q, K, M, Valid, Lse,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_vb, stride_vn,
    Tq, Tk, Hkv, num_splits,
    sm_scale, softcap, seed, layer, inv_tau,
    TUNE_KEY,  # unused by the body: only part of the autotuning key
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0: none, 1: bool as uint8 (nonzero = attend), 2: additive float
    CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    GUMBEL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    STATIC_ITERS: tl.constexpr,  # > 0 (interpreter only): fixed trip count
):
    """Pass 1, grid (row blocks * num_splits, B * Hkv): each row's log2-sum-exp of y over one split of the keys."""
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    split = pid % num_splits
    rblk = pid // num_splits
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    n_rows = Tq * GROUP

    t = rblk * BLOCK_R + tl.arange(0, BLOCK_R)
    r_valid = t < n_rows
    i = (t // GROUP).to(tl.int64)  # query index
    hq = hk * GROUP + t % GROUP
    pos = Tk - Tq + i  # query position
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :],
                mask=r_valid[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    m_rows = M + b * stride_mb + hq * stride_mh + i * stride_mm  # [BLOCK_R] pointers (unused without a mask)
    if GUMBEL:
        row_key = gumbel_row_key(seed, layer, b, hq, pos)

    per_split = (Tk + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, Tk)
    if CAUSAL:  # no key after the block's last query position
        i_last = tl.minimum((rblk * BLOCK_R + BLOCK_R - 1) // GROUP, Tq - 1)
        end = tl.minimum(end, Tk - Tq + i_last + 1)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_R], 0.0, tl.float32)
    for it in range(0, STATIC_ITERS if STATIC_ITERS > 0 else (tl.maximum(end - start, 0) + BLOCK_N - 1) // BLOCK_N):
        cols = start + it * BLOCK_N + offs_n
        n_valid = cols < end
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * sm_scale
        if HAS_SOFTCAP:
            # softcap * tanh(s / softcap) from exp2 (no libdevice), odd Taylor series near 0
            x = s / softcap
            ax = tl.abs(x)
            e = tl.exp2(ax * (-2.0 * LOG2E))
            th_big = (1.0 - e) / (1.0 + e)
            x2 = x * x
            th_small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
            th = tl.where(ax < 0.125, th_small, th_big)
            s = softcap * tl.where(x < 0, -th, th)
        if MASK_KIND == 1:
            mv = tl.load(m_rows[:, None] + cols[None, :] * stride_mn, mask=r_valid[:, None] & n_valid[None, :], other=0)
            s = tl.where(mv != 0, s, float("-inf"))
        elif MASK_KIND == 2:
            mv = tl.load(m_rows[:, None] + cols[None, :] * stride_mn, mask=r_valid[:, None] & n_valid[None, :],
                         other=0.0)
            s = s + mv.to(tl.float32)
        keep = n_valid[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= pos[:, None])
        if HAS_VALID:
            kv = tl.load(Valid + b * stride_vb + cols * stride_vn, mask=n_valid, other=0)
            keep = keep & (kv != 0)[None, :]
        s = tl.where(keep, s * LOG2E, float("-inf"))
        if GUMBEL:
            s = (s + gumbel_noise(row_key[:, None], cols[None, :]) * LOG2E) * inv_tau  # y, log2 units

        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.reduce(tl.exp2(s - m_use[:, None]), 1, _SUM)
        m_i = m_new

    # Lse: [B * Hkv, G * Tq, num_splits] float32, log2 units; -inf: no attendable key in this split
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    tl.store(Lse + (bh.to(tl.int64) * n_rows + t) * num_splits + split, lse, mask=r_valid)


def _colscore_sum_kernel(
    Q, K, M, Valid, Lse, Score,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_vb, stride_vn,
    Tq, Tk, Hkv, num_splits,
    sm_scale, softcap, seed, layer, inv_tau,
    TUNE_KEY,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SPL: tl.constexpr,  # >= num_splits, power of two
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    GUMBEL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    STATIC_ITERS: tl.constexpr,
):
    """Pass 2, grid (key blocks, B * Hkv): one block of keys stays put while the group's query rows stream by;
    score[key] = sum over rows of exp2(y - lse_row), rows of invalid positions and fully masked rows skipped."""
    LOG2E: tl.constexpr = 1.4426950408889634
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    n_rows = Tq * GROUP

    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, BLOCK_R)
    offs_sp = tl.arange(0, BLOCK_SPL)
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = cols < Tk
    k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)
    if DOT_FP32:
        kt = tl.trans(k.to(tl.float32))
    else:
        kt = tl.trans(k)
    col_keep = n_valid
    if HAS_VALID:
        kv = tl.load(Valid + b * stride_vb + cols * stride_vn, mask=n_valid, other=0)
        col_keep = col_keep & (kv != 0)
    lse_base = Lse + bh.to(tl.int64) * n_rows * num_splits

    r_first = 0
    if CAUSAL:  # rows before the first query that sees this key block add nothing
        r_first = tl.maximum(kb * BLOCK_N - (Tk - Tq), 0) * GROUP // BLOCK_R
    acc = tl.full([BLOCK_R, BLOCK_N], 0.0, tl.float32)
    for it in range(0, STATIC_ITERS if STATIC_ITERS > 0 else (n_rows + BLOCK_R - 1) // BLOCK_R - r_first):
        t = (r_first + it) * BLOCK_R + offs_r
        r_valid = t < n_rows
        i = (t // GROUP).to(tl.int64)
        hq = hk * GROUP + t % GROUP
        pos = Tk - Tq + i
        q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :],
                    mask=r_valid[:, None], other=0.0)
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
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
        if MASK_KIND == 1:
            m_rows = M + b * stride_mb + hq * stride_mh + i * stride_mm
            mv = tl.load(m_rows[:, None] + cols[None, :] * stride_mn, mask=r_valid[:, None] & n_valid[None, :], other=0)
            s = tl.where(mv != 0, s, float("-inf"))
        elif MASK_KIND == 2:
            m_rows = M + b * stride_mb + hq * stride_mh + i * stride_mm
            mv = tl.load(m_rows[:, None] + cols[None, :] * stride_mn, mask=r_valid[:, None] & n_valid[None, :],
                         other=0.0)
            s = s + mv.to(tl.float32)
        keep = col_keep[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= pos[:, None])
        s = tl.where(keep, s * LOG2E, float("-inf"))
        if GUMBEL:
            row_key = gumbel_row_key(seed, layer, b, hq, pos)
            s = (s + gumbel_noise(row_key[:, None], cols[None, :]) * LOG2E) * inv_tau

        # the row's log-sum-exp over all keys: merge pass 1's splits
        parts = tl.load(lse_base + t[:, None] * num_splits + offs_sp[None, :],
                        mask=r_valid[:, None] & (offs_sp < num_splits)[None, :], other=float("-inf"))
        m = tl.reduce(parts, 1, _MAX)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        den = tl.reduce(tl.exp2(parts - m_use[:, None]), 1, _SUM)
        lse = m_use + tl.log2(tl.where(den == 0.0, 1.0, den))
        row_ok = r_valid & (den > 0.0)
        if HAS_VALID:
            qv = tl.load(Valid + b * stride_vb + pos * stride_vn, mask=r_valid, other=0)
            row_ok = row_ok & (qv != 0)
        acc += tl.where(row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)

    tl.store(Score + bh.to(tl.int64) * Tk + cols, tl.reduce(acc, 0, _SUM), mask=n_valid)


_LSE_JIT = JITFunction(_colscore_lse_kernel, do_not_specialize=["Tq", "Tk", "Hkv", "num_splits", "seed", "layer",
                                                                 "TUNE_KEY"])
_SUM_JIT = JITFunction(_colscore_sum_kernel, do_not_specialize=["Tq", "Tk", "Hkv", "num_splits", "seed", "layer",
                                                                 "TUNE_KEY"])

_INTERPRET_CONFIG = dict(BLOCK_R=32, BLOCK_N=32, num_warps=4, num_stages=1)
_SMEM_BUDGET = 160 * 1024
_MIN_KEYS_PER_SPLIT = 1024  # pass 1 split-K (short query runs, e.g. SnapKV's window): at least this many keys each
_MAX_SPLITS = 64


def _autotune_configs():
    return [
        triton.Config({"BLOCK_R": r, "BLOCK_N": n}, num_warps=w, num_stages=st)
        for r, n, w, st in [
            (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
            (64, 128, 4, 2), (128, 128, 8, 2), (64, 32, 4, 3), (128, 32, 4, 3),
        ]
    ]


def _smem_bytes(block_r: int, block_n: int, head_dim: int, elem_size: int, stages: int) -> int:
    return max(stages, 1) * (block_r + block_n) * head_dim * elem_size


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs whose K/Q pipeline fits in shared memory and whose logit tile fits in registers: with the
    Gumbel hash or head_dim 256, a tile of more than 32 logits per thread spills (seen compiling for sm_90)."""
    d, es = kwargs["HEAD_DIM"], named_args["K"].element_size()
    per_thread = 32 if (kwargs.get("GUMBEL") or d > 128) else 64

    def smem(c):
        return _smem_bytes(c.kwargs["BLOCK_R"], c.kwargs["BLOCK_N"], d, es, c.num_stages)

    def tile(c):
        return c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)

    fits = [c for c in configs if smem(c) <= _SMEM_BUDGET]
    kept = [c for c in fits if tile(c) <= per_thread] or fits
    if not kept:  # e.g. fp32 with head_dim 256: the fixed small configuration
        cfg = _fixed_gpu_config(d, es)
        kept = [triton.Config({"BLOCK_R": cfg["BLOCK_R"], "BLOCK_N": cfg["BLOCK_N"]}, num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"])]
    return kept


_TUNE_KEYS = ["HEAD_DIM", "GROUP", "MASK_KIND", "CAUSAL", "GUMBEL", "TUNE_KEY"]  # + tensor dtypes (autotuner)
_LSE_TUNED = triton.autotune(configs=_autotune_configs(), key=_TUNE_KEYS,
                             prune_configs_by={"early_config_prune": _prune_configs})(_LSE_JIT)
_SUM_TUNED = triton.autotune(configs=_autotune_configs(), key=_TUNE_KEYS,
                             prune_configs_by={"early_config_prune": _prune_configs})(_SUM_JIT)


def _fixed_gpu_config(head_dim: int, elem_size: int) -> dict:
    for r, n, stages in ((64, 64, 2), (64, 32, 2), (32, 32, 2), (16, 16, 1)):
        if _smem_bytes(r, n, head_dim, elem_size, stages) <= _SMEM_BUDGET:
            return dict(BLOCK_R=r, BLOCK_N=n, num_warps=4, num_stages=stages)
    return dict(BLOCK_R=16, BLOCK_N=16, num_warps=4, num_stages=1)


def _bucket(n: int) -> int:
    return 0 if n <= 256 else (1 if n <= 4096 else 2)


def _lse_num_splits(rows: int, batch_heads: int, tk: int, sm_count: int | None) -> int:
    """Pass 1 split-K: only when the rows alone leave the GPU idle (few queries against many keys)."""
    if sm_count is None:
        return 1 if tk <= 64 else 2
    programs = batch_heads * -(-rows // 64)
    want = -(-(4 * sm_count) // max(programs, 1))
    return max(1, min(want, tk // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def supports(q, k) -> str | None:
    """None if the Triton kernels handle these tensors, else a short reason to fall back to the reference."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
        return "q must be [B, Hq, Tq, D] and k [B, Hkv, Tk, D]"
    D = q.shape[-1]
    if not (_da._is_pow2(D) and _da._MIN_HEAD_DIM <= D <= _da._MAX_HEAD_DIM):
        return f"head_dim {D} is not a power of two in [{_da._MIN_HEAD_DIM}, {_da._MAX_HEAD_DIM}]"
    if k.shape[-1] != D:
        return f"k head_dim {k.shape[-1]} != q head_dim {D}"
    if q.dtype not in _da._SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of fp16/bf16/fp32"
    if k.dtype != q.dtype:
        return f"k dtype {k.dtype} differs from q dtype {q.dtype}"
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        return f"q heads ({Hq}) not a multiple of k heads ({Hkv})"
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return "last dim of q/k must be contiguous"
    if q.device.type == "cuda":
        if q.dtype == torch.bfloat16 and _da._capability(q.device.index or 0)[0] < 8:
            return "bf16 needs compute capability >= 8.0"
        return None
    if q.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1" or _da.triton_interpreting():
            return None
        return "CPU tensors run the Triton kernel only under TRITON_INTERPRET=1"
    return f"device {q.device.type} is not supported"


def _check_inputs(q, k, scale, mask, valid, softcap, gumbel):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a [B, Hq, Tq, D] tensor, got shape {tuple(getattr(q, 'shape', ()))}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a [B, Hkv, Tk, D] tensor, got shape {tuple(getattr(k, 'shape', ()))}")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k batch size {Bk} does not match q batch size {B}")
    if Dk != D:
        raise ValueError(f"k head_dim {Dk} does not match q head_dim {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k heads ({Hkv})")
    if k.device != q.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    if softcap is None or not (float(softcap) >= 0.0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            raise ValueError(f"mask must be a bool or floating point tensor, got {getattr(mask, 'dtype', mask)}")
        if mask.device != q.device:
            raise ValueError(f"mask must be on {q.device}, got {mask.device}")
        if mask.dim() > 4:
            raise ValueError(f"mask must have at most 4 dims, got {tuple(mask.shape)}")
        try:
            torch.broadcast_shapes(tuple(mask.shape), (B, Hq, Tq, Tk))
            ok = torch.broadcast_shapes(tuple(mask.shape), (B, Hq, Tq, Tk)) == (B, Hq, Tq, Tk)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask {tuple(mask.shape)} is not broadcastable to [B, Hq, Tq, Tk] = {(B, Hq, Tq, Tk)}")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B, Tk):
            raise ValueError(f"valid must be a [B, Tk] = [{B}, {Tk}] bool tensor, got "
                             f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}")
        if valid.device != q.device:
            raise ValueError(f"valid must be on {q.device}, got {valid.device}")
        if Tq > Tk:
            raise ValueError(f"valid needs Tq <= Tk (query i sits at position Tk - Tq + i), got Tq={Tq} > Tk={Tk}")
    if gumbel is not None:
        if not isinstance(gumbel, GumbelScores):
            raise ValueError(f"gumbel must be a GumbelScores or None, got {type(gumbel).__name__}")
        if not (math.isfinite(float(gumbel.tau)) and float(gumbel.tau) > 0.0):
            raise ValueError(f"gumbel.tau must be a finite number > 0, got {gumbel.tau}")


def attention_column_scores(
    q: torch.Tensor,  # [B, Hq, Tq, D]
    k: torch.Tensor,  # [B, Hkv, Tk, D]
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    valid: torch.Tensor | None = None,
    softcap: float = 0.0,
    gumbel: GumbelScores | None = None,
) -> torch.Tensor:  # [B, Hkv, Tk] float32
    """:func:`attention_column_scores_reference` in two Triton passes, never holding a [Tq, Tk] matrix in memory.

    Pass 1 computes each query row's log-sum-exp of y (flash-style over key tiles, split over the keys when there
    are few queries); pass 2 (one program per block of keys) sums exp(y - lse) over the query rows and the group's
    heads.  A bool mask is read as bytes, an additive one in its own dtype, both through their (possibly 0) strides.
    q and k need a contiguous last dim.  Raises ValueError on malformed arguments or unsupported inputs
    (:func:`supports`; callers fall back to the reference).
    """
    _check_inputs(q, k, scale, mask, valid, softcap, gumbel)
    reason = supports(q, k)
    if reason is not None and not (q.device.type == "cpu" and reason.startswith("CPU tensors")):
        raise ValueError(f"attention_column_scores cannot run these inputs: {reason}")
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    score = torch.empty((B, Hkv, Tk), device=q.device, dtype=torch.float32)
    if B == 0 or Hkv == 0 or Tk == 0:
        return score
    if Tq == 0:
        return score.zero_()
    interpret = q.device.type != "cuda" or _da.triton_interpreting()
    softcap = float(softcap)

    if mask is None:
        mask_kind, m_arg, m_strides = 0, q, (0, 0, 0, 0)
    else:
        m_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_kind = 1 if mask.dtype == torch.bool else 2
        m_arg = m_arg.reshape((1,) * (4 - m_arg.dim()) + tuple(m_arg.shape)) if m_arg.dim() < 4 else m_arg
        m_arg = m_arg.expand(B, Hq, Tq, Tk)
        m_strides = m_arg.stride()
    if valid is None:
        v_arg, v_strides = q, (0, 0)
    else:
        v_arg = valid.view(torch.uint8)
        v_strides = v_arg.stride()
    if gumbel is None:
        seed, layer, inv_tau = 0, 0, 1.0
    else:  # the hash reduces seed and layer modulo 2**32 first (see kvfx.kernels.gumbel)
        seed, layer, inv_tau = int(gumbel.seed) & 0xFFFFFFFF, int(gumbel.layer) & 0xFFFFFFFF, 1.0 / float(gumbel.tau)

    rows = G * Tq
    num_splits = _lse_num_splits(rows, B * Hkv, Tk, None if interpret else _da._sm_count(q.device.index or 0))
    lse = torch.empty((B * Hkv, rows, num_splits), device=q.device, dtype=torch.float32)
    common = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        *m_strides,
        *v_strides,
        Tq, Tk, Hkv, num_splits,
        float(scale), softcap if softcap > 0 else 1.0, seed, layer, inv_tau,
        3 * _bucket(rows) + _bucket(Tk),
    )
    meta = dict(
        GROUP=G, HEAD_DIM=D, MASK_KIND=mask_kind, CAUSAL=bool(causal), HAS_VALID=valid is not None,
        HAS_SOFTCAP=softcap > 0, GUMBEL=gumbel is not None, DOT_FP32=interpret or q.dtype == torch.float32,
    )
    lse_args = (q, k, m_arg, v_arg, lse, *common)
    sum_args = (q, k, m_arg, v_arg, lse, score, *common)

    def lse_grid(meta_):
        return (-(-rows // meta_["BLOCK_R"]) * num_splits, B * Hkv)

    def sum_grid(meta_):
        return (-(-Tk // meta_["BLOCK_N"]), B * Hkv)

    block_spl = max(2, triton.next_power_of_2(num_splits))
    if interpret:
        cfg = _INTERPRET_CONFIG
        lse_iters = max(1, -(-(-(-Tk // num_splits)) // cfg["BLOCK_N"]))
        _da._interpreted(_colscore_lse_kernel)[lse_grid(cfg)](*lse_args, **meta, STATIC_ITERS=lse_iters, **cfg)
        sum_iters = -(-rows // cfg["BLOCK_R"])
        _da._interpreted(_colscore_sum_kernel)[sum_grid(cfg)](
            *sum_args, **meta, BLOCK_SPL=block_spl, STATIC_ITERS=sum_iters, **cfg)
    elif _da._autotune_enabled():
        _LSE_TUNED[lse_grid](*lse_args, **meta, STATIC_ITERS=0)
        _SUM_TUNED[sum_grid](*sum_args, **meta, BLOCK_SPL=block_spl, STATIC_ITERS=0)
    else:
        cfg = _fixed_gpu_config(D, q.element_size())
        _LSE_JIT[lse_grid(cfg)](*lse_args, **meta, STATIC_ITERS=0, **cfg)
        _SUM_JIT[sum_grid(cfg)](*sum_args, **meta, BLOCK_SPL=block_spl, STATIC_ITERS=0, **cfg)
    return score
