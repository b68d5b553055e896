"""Decode attention over a slot store that also returns each slot's attention score (H2O, Keyformer).

One query token per sequence attends to ``S`` cache slots of its KV head; some slots may be empty or not
attendable, which the additive ``bias`` marks with ``-inf``::

    q: [B, Hq, D]     k, v: [B, Hkv, S, D]     bias: [B, Hb, S] float32, Hb in {1, Hkv, Hq} (query head h reads
                                              bias row h // (Hq // Hb); broadcast strides allowed)
    x[b, h, s]   = softcap(scale * q[b, h] . k[b, h // G, s]) + bias[b, h // (Hq // Hb), s]
    out[b, h]    = softmax_s(x[b, h]) @ v[b, h // G]
    y            = x                                  (plain softmax scores, H2O)
                 = (x + g) / tau                       (Gumbel-softmax scores, Keyformer; g from kvfx.kernels.gumbel
                                                        at (seed, layer, b, h, qpos[b], kpos[b, h // G, s]))
    score[b, j, s] = sum over the G query heads h of KV head j of softmax_s(y[b, h])[s]      (float32)

The attention output never sees the noise. Tensors in, tensors out: nothing here knows about models or policies.

Kernel design (:func:`scored_decode_attention`): K and V are read once per call
-------------------------------------------------------------------------------
* Split kernel, grid ``(B * Hkv * num_splits,)``, the layout of ``kvfx.kernels.decode_attention``: one program per
  (batch, KV head, split) loads the G query heads of its group as one ``[BLOCK_G, D]`` block (G padded to >= 16 rows
  for ``tl.dot``) and streams its chunk of slots in blocks of ``BLOCK_N`` with an exp2 online softmax.  From the same
  logits it writes the score logits ``y`` (log2 units; ``x``, or ``(x + g) / tau`` with the Gumbel noise hashed in
  the kernel from (seed, layer, b, h, qpos, kpos)) for its slots into a float32 scratch ``Y [B, Hq, S]``, and per
  split and head the log2-sum-exp of the attention logits (which is also that of ``y`` without noise) and, with
  noise, that of ``y``.  With one split it writes the final output directly.
* The split kernel loads K and V with an ``evict_first`` L2 hint and stores the score logits with ``evict_last``,
  so that the finish kernel mostly reads them from L2.
* Finish kernel, grid ``(cdiv(S, BLOCK_S) [+ 1], B * Hkv)``: the programs of the first axis merge the per-split
  log-sum-exps of ``y`` into one per head and write ``score[b, j, s] = sum_g exp2(Y[b, jG + g, s] - lse_g)`` for a
  block of slots (reading the small Y scratch, never K); with several splits one extra program per (b, j) merges the
  partial outputs of the group's heads.
* CUDA: the split kernel is autotuned like decode_attention's (same ``KVFX_DECODE_AUTOTUNE`` switch; the tuning key
  adds the value head_dim and the noise flag, and is per power-of-two store size: a slot store keeps its size, so
  each is tuned once).  CPU tensors run the same kernels under the Triton interpreter.
* Slot mode (:class:`SlotMask`, used by kvfx.kernels.slot_decode): instead of a bias tensor, each slot's bias is read
  from the mask row at the slot's position, and the finish kernel (:class:`SlotEviction`) also adds the scores into
  the store's running score and writes each block of slots' eviction candidate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from kvfx.kernels import decode_attention as _da
from kvfx.kernels.gumbel import gumbel_noise, gumbel_noise_reference, gumbel_row_key

__all__ = ["GumbelScores", "Scratch", "scored_decode_attention", "scored_decode_attention_reference", "supports"]

_MAX = _da._MAX  # tl.reduce combine functions (see kvfx.kernels.decode_attention)
_MIN = tl.standard._elementwise_min
_SUM = _da._SUM


@dataclass(frozen=True)
class GumbelScores:
    """Keyformer's score: softmax((x + Gumbel noise) / tau) with the noise hashed from ``seed`` and ``layer``.

    ``tau``: a number, or a one-element float32 tensor on the kernel's device that the split kernel reads when it
    runs, so that a CUDA graph of the call replays with the temperature the tensor holds then (a tensor's value is
    not checked: reading it would sync with the device)."""

    seed: int
    layer: int
    tau: float | torch.Tensor


def scored_decode_attention_reference(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, Dv]
    bias: torch.Tensor,  # [B, 1|Hkv|Hq, S] float, -inf = not attended
    *,
    scale: float,
    softcap: float = 0.0,
    gumbel: GumbelScores | None = None,
    qpos: torch.Tensor | None = None,  # [B] int: the query's position (Gumbel noise only)
    kpos: torch.Tensor | None = None,  # [B, Hkv, S] int: each slot's position (Gumbel noise only)
) -> tuple[torch.Tensor, torch.Tensor]:  # out [B, Hq, Dv] in q.dtype, score [B, Hkv, S] float32
    """The fp32 torch reference (and CPU path)."""
    b, hq, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    kf = k.float().repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    vf = v.float().repeat_interleave(group, dim=1)
    x = torch.einsum("bhd,bhsd->bhs", q.float(), kf) * scale  # [B, Hq, S]
    if softcap:
        x = torch.tanh(x / softcap) * softcap
    x = x + bias.float().repeat_interleave(hq // bias.shape[1], dim=1).expand(b, hq, s)
    probs = torch.softmax(x, dim=-1)
    out = torch.einsum("bhs,bhsd->bhd", probs, vf).to(q.dtype)
    if gumbel is not None:
        if qpos is None or kpos is None:
            raise ValueError("Gumbel scores need qpos and kpos")
        rows = torch.arange(b, device=q.device).view(b, 1, 1)
        heads = torch.arange(hq, device=q.device).view(1, hq, 1)
        slot_pos = kpos.repeat_interleave(group, dim=1)  # [B, Hq, S]
        noise = gumbel_noise_reference(gumbel.seed, gumbel.layer, rows, heads, qpos.view(b, 1, 1), slot_pos)
        probs = torch.softmax((x + noise.to(x.device)) / gumbel.tau, dim=-1)
    return out, probs.view(b, hkv, group, s).sum(dim=2)


# --------------------------------------------------------------------------------------
# Triton kernels.  House rules of kvfx.kernels.decode_attention: plain functions wrapped
# as compiled and interpreted variants, no triton.language.standard @jit helpers in the
# bodies (reductions through tl.reduce with the standard combine functions), constexpr
# trip counts under the interpreter.  The Gumbel hash helpers of kvfx.kernels.gumbel are
# device functions that work compiled and interpreted.
# --------------------------------------------------------------------------------------


def _scored_split_kernel(
    Q, K, V, Bias, Qpos, Kpos, Tau, O, Opart, Lse, LseY, Y,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn,
    stride_qpos,
    stride_pb, stride_ph, stride_pn,
    stride_ob, stride_oh,
    S, num_splits, Hkv, bias_div,
    sm_scale, softcap, seed, layer, inv_tau,
    mask_offset, masked_below,
    TUNE_KEY,  # unused by the body: only part of the autotuning key
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BIAS_PER_HEAD: tl.constexpr,  # bias row = hq // bias_div (else one row per group: hk // bias_div)
    SLOT_MASK: tl.constexpr,  # Bias is a mask row read at each slot's position (see slot_decode)
    MASK_KIND: tl.constexpr,  # SLOT_MASK only: 0 no mask, 1 bool (uint8, 0 = masked), 2 additive float
    HAS_SOFTCAP: tl.constexpr,
    GUMBEL: tl.constexpr,
    TAU_IN_MEMORY: tl.constexpr,  # GUMBEL: the temperature is Tau[0] (inv_tau unused)
    DOT_FP32: tl.constexpr,
    DIRECT_OUT: tl.constexpr,  # num_splits == 1: write the final output in O's dtype
    STATIC_ITERS: tl.constexpr,  # > 0 (interpreter only): fixed trip count
    KV_POLICY: tl.constexpr = "",  # L2 eviction hints: K/V streamed once, the score logits read again soon
    Y_POLICY: tl.constexpr = "",
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

    per_split = (S + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, S)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if BIAS_PER_HEAD:
        bias_rows = Bias + b * stride_bb + (hq // bias_div) * stride_bh  # [BLOCK_G] pointers
    else:
        bias_row = Bias + b * stride_bb + (hk // bias_div) * stride_bh
    y_rows = Y + row * S  # Y: [B, Hq, S] float32 contiguous
    if GUMBEL or SLOT_MASK:
        kp_base = Kpos + b * stride_pb + hk * stride_ph
    if GUMBEL:
        qp = tl.load(Qpos + b * stride_qpos)
        row_key = gumbel_row_key(seed, layer, b, hq, qp)  # [BLOCK_G] uint32
        if TAU_IN_MEMORY:
            inv_tau = 1.0 / tl.load(Tau).to(tl.float32)
        my_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        ly_i = tl.full([BLOCK_G], 0.0, tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, HEAD_DV], 0.0, tl.float32)

    for it in range(0, STATIC_ITERS if STATIC_ITERS > 0 else (tl.maximum(end - start, 0) + BLOCK_N - 1) // BLOCK_N):
        cols = start + it * BLOCK_N + offs_n
        n_valid = cols < end
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=n_valid[:, None], other=0.0,
                    eviction_policy=KV_POLICY)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :], mask=n_valid[:, None], other=0.0,
                    eviction_policy=KV_POLICY)
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
        if GUMBEL or SLOT_MASK:
            kp = tl.load(kp_base + cols * stride_pn, mask=n_valid, other=-1)
        if SLOT_MASK:
            # empty slots (kp < 0) and positions before the mask's first column are not attended; the others read
            # the mask at their position: column kp - mask_offset of each query head's row
            column = kp - mask_offset
            present = (kp >= 0) & (column >= 0) & n_valid
            if MASK_KIND == 0:
                s = s + tl.where(present, 0.0, float("-inf"))[None, :]
            else:
                mv = tl.load(bias_rows[:, None] + column[None, :] * stride_bn,
                             mask=g_valid[:, None] & present[None, :], other=0)
                if MASK_KIND == 1:
                    add = tl.where(mv != 0, 0.0, float("-inf"))
                else:
                    mv = mv.to(tl.float32)
                    add = tl.where(mv > masked_below, mv, float("-inf"))
                s = s + tl.where(present[None, :], add, float("-inf"))
        elif BIAS_PER_HEAD:
            bias = tl.load(bias_rows[:, None] + cols[None, :] * stride_bn, mask=g_valid[:, None] & n_valid[None, :],
                           other=0.0)
            s = s + bias.to(tl.float32)
        else:
            bias = tl.load(bias_row + cols * stride_bn, mask=n_valid, other=0.0)
            s = s + bias.to(tl.float32)[None, :]
        s = tl.where(n_valid[None, :], s * LOG2E, float("-inf"))  # the logits x, in log2 units

        if GUMBEL:
            noise = gumbel_noise(row_key[:, None], kp[None, :])
            y = (s + noise * LOG2E) * inv_tau  # -inf stays -inf
            my_new = tl.maximum(my_i, tl.reduce(y, 1, _MAX))
            my_use = tl.where(my_new == float("-inf"), 0.0, my_new)
            ly_i = ly_i * tl.exp2(my_i - my_use) + tl.reduce(tl.exp2(y - my_use[:, None]), 1, _SUM)
            my_i = my_new
            tl.store(y_rows[:, None] + cols[None, :], y, mask=g_valid[:, None] & n_valid[None, :],
                     eviction_policy=Y_POLICY)
        else:
            tl.store(y_rows[:, None] + cols[None, :], s, mask=g_valid[:, None] & n_valid[None, :],
                     eviction_policy=Y_POLICY)

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

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # l == 0 only if every slot was masked: acc == 0
    out = acc / l_safe[:, None]
    # Lse, LseY: [B, Hq, num_splits] float32 (log2 units); Opart: [B, Hq, num_splits, Dv] float32
    part = row * num_splits + split
    tl.store(Lse + part, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=g_valid)
    if GUMBEL:
        ly_safe = tl.where(ly_i == 0.0, 1.0, ly_i)
        tl.store(LseY + part, tl.where(ly_i == 0.0, float("-inf"), my_i + tl.log2(ly_safe)), mask=g_valid)
    if DIRECT_OUT:
        o_ptrs = O + b * stride_ob + hq[:, None] * stride_oh + offs_dv[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=g_valid[:, None])
    else:
        tl.store(Opart + part[:, None] * HEAD_DV + offs_dv[None, :], out, mask=g_valid[:, None])


def _scored_finish_kernel(
    Y, Lse, LseY, Opart, O, Score,
    Pos, Lo, Hi, FromSeen, ByScore, PartKey, PartPos, PartSlot, PartFree, Seen,
    stride_ob, stride_oh,
    S, num_splits, Hkv, seen,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= GROUP, power of two (no tl.dot here: no padding to 16)
    HEAD_DV: tl.constexpr,
    BLOCK_SPL: tl.constexpr,  # >= num_splits, power of two
    CHUNK_SPL: tl.constexpr,  # splits merged per iteration (power of two)
    BLOCK_S: tl.constexpr,  # slots per score program
    MERGE_OUT: tl.constexpr,  # num_splits > 1: the last program of axis 0 merges the partial outputs
    STATIC_SPLITS: tl.constexpr,  # > 0 (interpreter only): constexpr trip count of the merge loop (chunks)
    EVICT: tl.constexpr,  # Score is the slot store's running score: add (ACCUMULATE) and rank slots for eviction
    ACCUMULATE: tl.constexpr,
    SEEN_IN_MEMORY: tl.constexpr = False,  # seen is Seen[0] + 1 (a device counter of the tokens written before)
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_valid = offs_g < GROUP
    hq = hk * GROUP + offs_g
    row = b * (Hkv * GROUP) + hq
    offs_sp = tl.arange(0, BLOCK_SPL)
    sp_mask = g_valid[:, None] & (offs_sp < num_splits)[None, :]

    if pid_s * BLOCK_S < S:
        # score of slots [pid_s * BLOCK_S, +BLOCK_S) summed over the group's heads
        lse_all = tl.load(LseY + row[:, None] * num_splits + offs_sp[None, :], mask=sp_mask, other=float("-inf"))
        m = tl.reduce(lse_all, 1, _MAX)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        den = tl.reduce(tl.exp2(lse_all - m_use[:, None]), 1, _SUM)
        lse = m_use + tl.log2(tl.where(den == 0.0, 1.0, den))
        cols = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        c_valid = cols < S
        y = tl.load(Y + row[:, None] * S + cols[None, :], mask=g_valid[:, None] & c_valid[None, :], other=float("-inf"))
        p = tl.where((den > 0.0)[:, None], tl.exp2(y - lse[:, None]), 0.0)
        contribution = tl.reduce(p, 0, _SUM)
        if EVICT:
            # the running score, then this block's eviction candidate (kvfx.kernels.slot_decode.keep_priority):
            # the lowest keep-priority, ties to the oldest position; and its first empty slot
            BIG: tl.constexpr = 2**62
            slots = (b * Hkv + hk) * S + cols
            cols64 = cols.to(tl.int64)
            pos = tl.load(Pos + slots, mask=c_valid, other=-1)
            live = pos >= 0
            score = tl.load(Score + slots, mask=c_valid, other=0.0)
            if ACCUMULATE:
                score = score + contribution
                tl.store(Score + slots, score, mask=c_valid & live)
            first_head = tl.reduce(tl.where((offs_g == 0)[:, None], y, float("-inf")), 0, _MAX)
            if SEEN_IN_MEMORY:
                seen_now = tl.load(Seen) + 1
            else:
                seen_now = seen.to(tl.int64)
            hi = tl.load(Hi + b * Hkv + hk) + seen_now * tl.load(FromSeen + hk).to(tl.int64)
            protected = (pos < tl.load(Lo + b * Hkv + hk)) | (pos >= hi)
            key = tl.where(tl.load(ByScore + hk) != 0, score, pos.to(tl.float32))
            key = tl.where(protected, float("inf"), key)
            key = tl.where(first_head == float("-inf"), float("-inf"), key)  # no query attends it: first to go
            key = tl.where(live, key, float("inf"))
            tie = tl.where(live, pos, BIG)
            lowest = tl.reduce(key, 0, _MIN)
            oldest = tl.reduce(tl.where(key == lowest, tie, BIG), 0, _MIN)
            slot = tl.reduce(tl.where((key == lowest) & (tie == oldest), cols64, BIG), 0, _MIN)
            part = (b * Hkv + hk) * tl.num_programs(0) + pid_s
            tl.store(PartKey + part, lowest)
            tl.store(PartPos + part, oldest)
            tl.store(PartSlot + part, slot)
            tl.store(PartFree + part, tl.reduce(tl.where(live | ~c_valid, BIG, cols64), 0, _MIN))
        else:
            tl.store(Score + (b * Hkv + hk) * S + cols, contribution, mask=c_valid)
    else:
        if MERGE_OUT:
            lse_all = tl.load(Lse + row[:, None] * num_splits + offs_sp[None, :], mask=sp_mask, other=float("-inf"))
            m = tl.reduce(lse_all, 1, _MAX)
            m_use = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights all 0
            den = tl.reduce(tl.exp2(lse_all - m_use[:, None]), 1, _SUM)
            offs_dv = tl.arange(0, HEAD_DV)
            offs_c = tl.arange(0, CHUNK_SPL)
            acc = tl.full([BLOCK_G, HEAD_DV], 0.0, tl.float32)
            # CHUNK_SPL splits' partial outputs per iteration, loaded at once (a load per split would chain
            # num_splits memory latencies)
            for c in range(0, STATIC_SPLITS if STATIC_SPLITS > 0 else (num_splits + CHUNK_SPL - 1) // CHUNK_SPL):
                sp = c * CHUNK_SPL + offs_c  # [CHUNK_SPL]
                valid = g_valid[:, None] & (sp < num_splits)[None, :]  # [BLOCK_G, CHUNK_SPL]
                part = row[:, None] * num_splits + sp[None, :]
                w = tl.exp2(tl.load(Lse + part, mask=valid, other=float("-inf")) - m_use[:, None])
                o = tl.load(Opart + part[:, :, None] * HEAD_DV + offs_dv[None, None, :], mask=valid[:, :, None],
                            other=0.0)  # [BLOCK_G, CHUNK_SPL, HEAD_DV]
                acc += tl.reduce(o * w[:, :, None], 1, _SUM)
            out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
            o_ptrs = O + b * stride_ob + hq[:, None] * stride_oh + offs_dv[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=g_valid[:, None])


_SPLIT_JIT = JITFunction(_scored_split_kernel, do_not_specialize=["S", "num_splits", "Hkv", "bias_div", "seed", "layer",
                                                                  "mask_offset", "TUNE_KEY"])
_FINISH_JIT = JITFunction(_scored_finish_kernel, do_not_specialize=["S", "num_splits", "Hkv", "seen"])


# L2 hints: K and V are streamed once (evict_first), the score logits are read back by the finish kernel right away
# (evict_last): kept in the 50 MB L2 instead of a round trip to memory. H100, B=8, 32/8 heads, d=128, 6555 slots:
# 87.8 -> 82.4 us (read flush), 95.3 -> 92.0 us (memset flush); benchmarks/results/split_sweep_h100.txt.
_Y_IN_L2 = True


def _smem_bytes(block_n: int, head_dim: int, head_dv: int, elem_size: int, stages: int) -> int:
    return max(stages, 1) * block_n * (head_dim + head_dv) * elem_size


def _prune_configs(configs, named_args, **kwargs):
    d, dv = kwargs["HEAD_DIM"], kwargs["HEAD_DV"]
    es = named_args["K"].element_size()
    fits = [c for c in configs if _smem_bytes(c.kwargs["BLOCK_N"], d, dv, es, c.num_stages) <= _da._SMEM_BUDGET]
    return fits or [min(configs, key=lambda c: _smem_bytes(c.kwargs["BLOCK_N"], d, dv, es, c.num_stages))]


_SPLIT_TUNED = triton.autotune(
    configs=_da._autotune_configs(),
    key=["HEAD_DIM", "HEAD_DV", "GROUP", "GUMBEL", "TUNE_KEY"],  # the autotuner appends the tensor dtypes itself
    prune_configs_by={"early_config_prune": _prune_configs},
)(_SPLIT_JIT)


def _fixed_gpu_config(head_dim: int, head_dv: int, elem_size: int) -> dict:
    for block_n, stages in ((64, 3), (64, 2), (32, 3), (32, 2), (16, 2)):
        if _smem_bytes(block_n, head_dim, head_dv, elem_size, stages) <= _da._SMEM_BUDGET:
            return dict(BLOCK_N=block_n, num_warps=4, num_stages=stages)
    return dict(BLOCK_N=16, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def supports(q, k, v=None) -> str | None:
    """None if the Triton kernel handles these tensors, else a short reason to fall back to the reference."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 3 or k.dim() != 4:
        return "q must be [B, Hq, D] and k [B, Hkv, S, D]"
    D = q.shape[-1]
    dims = [("head_dim", D)] + ([("value head_dim", v.shape[-1])] if isinstance(v, torch.Tensor) else [])
    for what, d in dims:
        if not (_da._is_pow2(d) and _da._MIN_HEAD_DIM <= d <= _da._MAX_HEAD_DIM):
            return f"{what} {d} is not a power of two in [{_da._MIN_HEAD_DIM}, {_da._MAX_HEAD_DIM}]"
    if k.shape[-1] != D:
        return f"k head_dim {k.shape[-1]} != q head_dim {D}"
    if q.dtype not in _da._SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of fp16/bf16/fp32"
    if k.dtype != q.dtype or (isinstance(v, torch.Tensor) and v.dtype != q.dtype):
        return f"k/v dtype {k.dtype}/{getattr(v, 'dtype', k.dtype)} differs from q dtype {q.dtype}"
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        return f"q heads ({Hq}) not a multiple of k heads ({Hkv})"
    G = Hq // Hkv
    dv = v.shape[-1] if isinstance(v, torch.Tensor) else D
    if max(16, triton.next_power_of_2(G)) * max(D, dv) > _da._MAX_BLOCK_ELEMS:
        return f"group size {G} with head_dim {max(D, dv)} is too large for one program"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or (isinstance(v, torch.Tensor) and v.stride(-1) != 1):
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


def _int_tensor(t, name, shape, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32/int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} must be broadcastable to {list(shape)}, got {list(t.shape)}") from None


def _check_inputs(q, k, v, bias, scale, softcap, gumbel, qpos, kpos, num_splits):
    """Validate arguments; returns the bias [B, Hb, S], qpos [B] and kpos [B, Hkv, S] views (no noise: None, None)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [B, Hq, D] tensor, got shape {tuple(getattr(q, 'shape', ()))}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a [B, Hkv, S, D] tensor, got shape {tuple(getattr(k, 'shape', ()))}")
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"v must be [B, Hkv, S, Dv] with k's first three dims {tuple(k.shape[:3])}, "
                         f"got {tuple(getattr(v, 'shape', ()))}")
    B, Hq, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k batch size {Bk} does not match q batch size {B}")
    if Dk != D:
        raise ValueError(f"k head_dim {Dk} does not match q head_dim {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        raise ValueError(f"bias must be a floating point tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
    if bias.device != q.device:
        raise ValueError(f"bias must be on {q.device}, got {bias.device}")
    Hb = bias.shape[1] if bias.dim() == 3 else 0
    if bias.dim() != 3 or Hb == 0 or Hq % Hb != 0 or bias.shape[0] not in (1, B) or bias.shape[2] not in (1, S):
        raise ValueError(f"bias must be [B, 1|Hkv|Hq, S] = [{B}, 1|{Hkv}|{Hq}, {S}] (broadcastable), "
                         f"got {tuple(bias.shape)}")
    bias = bias.expand(B, Hb, S)
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    if softcap is None or not (float(softcap) >= 0.0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if gumbel is None:
        return bias, None, None
    if not isinstance(gumbel, GumbelScores):
        raise ValueError(f"gumbel must be a GumbelScores or None, got {type(gumbel).__name__}")
    if isinstance(gumbel.tau, torch.Tensor):
        tau = gumbel.tau
        if tau.numel() != 1 or tau.dtype != torch.float32 or tau.device != q.device:
            raise ValueError(f"a tensor gumbel.tau must be one float32 element on {q.device}, got "
                             f"{tau.numel()} {tau.dtype} element(s) on {tau.device}")
    elif not (math.isfinite(float(gumbel.tau)) and float(gumbel.tau) > 0.0):
        raise ValueError(f"gumbel.tau must be a finite number > 0, got {gumbel.tau}")
    if qpos is None or kpos is None:
        raise ValueError("Gumbel scores need qpos and kpos")
    return bias, _int_tensor(qpos, "qpos", (B,), q.device), _int_tensor(kpos, "kpos", (B, Hkv, S), q.device)


def scored_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, Dv]
    bias: torch.Tensor,  # [B, 1|Hkv|Hq, S] float, -inf = not attended
    *,
    scale: float,
    softcap: float = 0.0,
    gumbel: GumbelScores | None = None,
    qpos: torch.Tensor | None = None,
    kpos: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused decode attention over a slot store plus each slot's score: :func:`scored_decode_attention_reference`.

    One pass over K and V.  k, v (and q) need a contiguous last dim, other strides are free; bias, qpos and kpos may
    have any strides (stride 0 included).  Every row needs a finite logit (as the reference; a row without one gives
    a zero output and zero scores here, NaN there).  Raises ValueError on malformed arguments or inputs the kernel
    does not support (:func:`supports`; callers fall back to the reference).
    """
    bias, qpos, kpos = _check_inputs(q, k, v, bias, scale, softcap, gumbel, qpos, kpos, num_splits)
    reason = supports(q, k, v)
    if reason is not None and not (q.device.type == "cpu" and reason.startswith("CPU tensors")):
        raise ValueError(f"scored_decode_attention cannot run these inputs: {reason}")
    B, Hkv, S = k.shape[0], k.shape[1], k.shape[2]
    score = torch.empty((B, Hkv, S), device=q.device, dtype=torch.float32)
    out = launch(q, k, v, bias, score, scale=scale, softcap=softcap, gumbel=gumbel, qpos=qpos, kpos=kpos,
                 num_splits=num_splits)
    return out, score


@dataclass(frozen=True)
class SlotMask:
    """Slot mode of :func:`launch`: the bias of slot s is read from a mask row at the slot's position.

    ``row`` ``[B|1, 1|Hq, Tk]`` (bool: True = attend, or float additive; None: no mask) covers positions
    ``offset .. offset + Tk - 1``; empty slots (position < 0), positions before ``offset`` and float entries
    ``<= masked_below`` are not attended."""

    row: torch.Tensor | None
    offset: int
    masked_below: float


@dataclass(frozen=True)
class SlotEviction:
    """Eviction mode of :func:`launch`: ``score`` is the store's running score (added to when ``accumulate``) and
    each block of slots writes its eviction candidate (see kvfx.kernels.slot_decode)."""

    lo: torch.Tensor  # [B, Hkv] int64
    hi: torch.Tensor  # [B, Hkv] int64
    from_seen: torch.Tensor  # [Hkv] int8
    by_score: torch.Tensor  # [Hkv] int8
    seen: int
    accumulate: bool
    counter: torch.Tensor | None = None  # [1] int64 on the device: tokens written before this one; seen = counter + 1


class Scratch:
    """Work buffers of a caller that launches with the same shapes call after call (a slot store): reused instead of
    allocated at every call. One caller, one stream: a buffer is rewritten by the next launch."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


def _fresh(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def launch(q, k, v, bias, score, *, scale, softcap, gumbel, qpos, kpos, num_splits=None,
           slot_mask: SlotMask | None = None, evict: SlotEviction | None = None, scratch: Scratch | None = None,
           out: torch.Tensor | None = None):
    """Run the split and finish kernels on validated inputs; returns the output (score filled in place), written
    into ``out`` (``[B, Hq, Dv]`` in q's dtype, contiguous) where given.

    With ``evict``, returns ``(out, partials)``: per (row, KV head) and block of slots, the block's lowest key,
    its position and slot, and the block's first empty slot (int64 ``[B * Hkv, blocks]`` each, blocks in
    ``partials[4]``)."""
    B, Hq, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    softcap = float(softcap)
    interpret = q.device.type != "cuda" or _da.triton_interpreting()

    out = torch.empty((B, Hq, Dv), device=q.device, dtype=q.dtype) if out is None else out
    if B == 0 or Hq == 0 or S == 0:
        out.zero_()
        return (out, None) if evict is not None else out
    result = out
    if interpret and q.dtype == torch.bfloat16:
        # the interpreter's fp32 -> bf16 cast truncates; write fp32 and let torch round to nearest even
        out = torch.empty((B, Hq, Dv), device=q.device, dtype=torch.float32)

    if num_splits is None:
        num_splits = _da.default_num_splits(B, Hkv, S, None if interpret else _da._sm_count(q.device.index or 0))
    num_splits = min(num_splits, S)
    direct = num_splits == 1

    work = scratch.empty if scratch is not None else _fresh
    f32 = torch.float32
    y = work("y", (B, Hq, S), f32, q.device)
    lse = work("lse", (B, Hq, num_splits), f32, q.device)
    lse_y = work("lse_y", (B, Hq, num_splits), f32, q.device) if gumbel is not None else lse
    opart = out if direct else work("opart", (B, Hq, num_splits, Dv), f32, q.device)
    tau_arg, tau_in_memory = q, False  # (q: a pointer the kernel does not read)
    if gumbel is None:
        seed, layer, inv_tau = 0, 0, 1.0
    else:
        # the hash reduces seed and layer modulo 2**32 first (see kvfx.kernels.gumbel)
        seed, layer = int(gumbel.seed) & 0xFFFFFFFF, int(gumbel.layer) & 0xFFFFFFFF
        tau_in_memory = isinstance(gumbel.tau, torch.Tensor)
        tau_arg, inv_tau = (gumbel.tau, 1.0) if tau_in_memory else (q, 1.0 / float(gumbel.tau))
    qpos_arg, qpos_stride = (qpos, qpos.stride(0)) if gumbel is not None else (q, 0)
    kpos_arg, kpos_strides = (kpos, kpos.stride()) if kpos is not None else (q, (0, 0, 0))
    mask_kind, mask_offset, masked_below = 0, 0, 0.0
    if slot_mask is not None:
        row = slot_mask.row
        mask_offset, masked_below = int(slot_mask.offset), float(slot_mask.masked_below)
        if row is None:
            bias = q.new_zeros(1, 1, 1)  # not read
        else:
            mask_kind = 1 if row.dtype == torch.bool else 2
            bias = row.view(torch.uint8) if row.dtype == torch.bool else row
    Hb = bias.shape[1]
    per_head = slot_mask is not None or Hkv % Hb != 0  # else one bias row serves a whole group: hk // (Hkv // Hb)
    bias_div = Hq // Hb if per_head else Hkv // Hb

    args = (
        q, k, v, bias, qpos_arg, kpos_arg, tau_arg, out, opart, lse, lse_y, y,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *bias.stride(),
        qpos_stride,
        *kpos_strides,
        out.stride(0), out.stride(1),
        S, num_splits, Hkv, bias_div,
        float(scale), softcap if softcap > 0 else 1.0, seed, layer, inv_tau,
        mask_offset, masked_below,
        S.bit_length(),  # tuned per power-of-two store size (a slot store keeps its size: tuned once)
    )
    meta = dict(
        GROUP=G, BLOCK_G=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, HEAD_DV=Dv,
        BIAS_PER_HEAD=per_head, SLOT_MASK=slot_mask is not None, MASK_KIND=mask_kind, HAS_SOFTCAP=softcap > 0,
        GUMBEL=gumbel is not None, TAU_IN_MEMORY=tau_in_memory, DOT_FP32=interpret or q.dtype == torch.float32,
        DIRECT_OUT=direct,
        **(dict(KV_POLICY="evict_first", Y_POLICY="evict_last") if _Y_IN_L2 else {}),
    )
    grid = (B * Hkv * num_splits,)
    if interpret:
        bn = _da._INTERPRET_CONFIG["BLOCK_N"]
        iters = max(-(-(-(-S // num_splits)) // bn), 1)
        _da._interpreted(_scored_split_kernel)[grid](*args, **meta, STATIC_ITERS=iters, **_da._INTERPRET_CONFIG)
    elif _da._autotune_enabled():
        _SPLIT_TUNED[grid](*args, **meta, STATIC_ITERS=0)
    else:
        _SPLIT_JIT[grid](*args, **meta, STATIC_ITERS=0, **_fixed_gpu_config(D, Dv, q.element_size()))

    block_g = triton.next_power_of_2(G)
    block_s = 64 if interpret else min(1024, max(64, 4096 // block_g))
    n_sblocks = -(-S // block_s)
    programs = n_sblocks + (0 if direct else 1)
    if evict is not None:
        partials = [work(f"partial{i}", (B * Hkv, programs), dt, q.device)
                    for i, dt in enumerate((torch.float32, torch.int64, torch.int64, torch.int64))]
        counter = evict.counter if evict.counter is not None else score
        evict_args = (kpos, evict.lo, evict.hi, evict.from_seen, evict.by_score, *partials, counter)
        seen = int(evict.seen)
    else:
        evict_args, seen = (score,) * 10, 0
    block_spl = max(2, triton.next_power_of_2(num_splits))
    chunk_spl = min(block_spl, max(2, 4096 // (block_g * Dv)))  # <= 4096 partial-output floats per iteration
    finish = _da._interpreted(_scored_finish_kernel) if interpret else _FINISH_JIT
    finish[(programs, B * Hkv)](
        y, lse, lse_y, opart, out, score, *evict_args,
        out.stride(0), out.stride(1),
        S, num_splits, Hkv, seen,
        GROUP=G, BLOCK_G=block_g, HEAD_DV=Dv, BLOCK_SPL=block_spl, CHUNK_SPL=chunk_spl,
        BLOCK_S=block_s, MERGE_OUT=not direct, STATIC_SPLITS=-(-num_splits // chunk_spl) if interpret else 0,
        EVICT=evict is not None, ACCUMULATE=evict is not None and evict.accumulate,
        SEEN_IN_MEMORY=evict is not None and evict.counter is not None,
        num_warps=4,
    )
    if out is not result:
        result.copy_(out)
    return (result, (*partials, n_sblocks)) if evict is not None else result
