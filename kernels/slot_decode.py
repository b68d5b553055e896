"""One decode step over a fixed-budget slot store: write the new token, attend, score, and empty one slot.

The store of one attention layer, per (row b, KV head j), ``C`` slots updated in place::

    k: [B, Hkv, C, D]   v: [B, Hkv, C, Dv]   pos: [B, Hkv, C] int64 (-1 = empty)   score: [B, Hkv, C] float32
    live: [B, Hkv] int64 (slots in use)      free: [B, Hkv] int64 (an empty slot: where the next token goes)

A step (:func:`write_slot`, then :func:`slot_decode_step`):

1. The new token's key and value go into slot ``free``, with position ``new_pos`` and score 0; ``live += 1``.
2. The query attends over every slot. Slot s of query head h gets the additive bias of the mask row at its
   position (``row[b, h, pos - offset]``; bool rows: True = attend); empty slots, positions before the row and
   float entries ``<= masked_below`` are not attended. Each slot's score contribution is the softmax (or Gumbel-
   softmax, see :mod:`kvfx.kernels.scored_decode_attention`) probability summed over the G query heads of its KV
   head; with ``accumulate`` it is added to ``score``.
3. Where ``live > budget``, the slot of lowest :func:`keep_priority` is emptied (ties: the oldest position; a slot
   that the group's first query head does not attend goes first) and becomes ``free``; otherwise ``free`` is the
   first empty slot (``C`` if there is none: the caller grows the store).

Keep-priority (higher is kept) is ``inf`` for protected positions, ``pos < lo`` or ``pos >= hi + seen * from_seen``;
otherwise the running score (``by_score``) or the position itself (older goes first)::

    lo, hi: [B, Hkv] int64        from_seen, by_score: [Hkv] bool

CUDA tensors run Triton kernels: a write kernel; the split kernel of scored_decode_attention reading the mask at
each slot's position; its finish kernel, which also adds the scores and finds each block of slots' eviction
candidate; and a last kernel that picks each (row, head)'s victim. Four launches, no host sync, K and V read once.
Given a device ``counter`` (the tokens written so far), the kernels read the new token's position and the length
from it instead of their int arguments and the last kernel advances it, so that the step can be captured once in a
CUDA graph and replayed (kvfx.eviction.step_graph).
CPU tensors run the torch reference (:func:`slot_decode_step_reference`), or the kernels under TRITON_INTERPRET=1.
Tensors in, tensors out: nothing here knows about policies or models.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from kvfx.kernels import decode_attention as _da
from kvfx.kernels import scored_decode_attention as _sda
from kvfx.kernels.scored_decode_attention import GumbelScores, scored_decode_attention_reference

__all__ = ["EvictionRule", "SlotStore", "keep_priority", "slot_decode_step", "slot_decode_step_reference",
           "write_slot", "write_slot_reference"]

INF = float("inf")
_BIG = 2**62


@dataclass(frozen=True)
class SlotStore:
    """The slot store of one layer; every tensor is updated in place."""

    k: Tensor  # [B, Hkv, C, D]
    v: Tensor  # [B, Hkv, C, Dv]
    pos: Tensor  # [B, Hkv, C] int64, -1 = empty
    score: Tensor  # [B, Hkv, C] float32
    live: Tensor  # [B, Hkv] int64
    free: Tensor  # [B, Hkv] int64


@dataclass(frozen=True)
class EvictionRule:
    """Which slot a (row, KV head) over its budget empties."""

    budget: Tensor  # [B, Hkv] int64
    lo: Tensor  # [B, Hkv] int64: positions below are protected
    hi: Tensor  # [B, Hkv] int64: positions from hi (+ seen where from_seen) on are protected
    from_seen: Tensor  # [Hkv] bool
    by_score: Tensor  # [Hkv] bool: rank by score, else by position

    @functools.cached_property
    def flags_int8(self) -> tuple[Tensor, Tensor]:
        """``from_seen`` and ``by_score`` as the kernels read them (int8), converted once per rule."""
        return self.from_seen.to(torch.int8), self.by_score.to(torch.int8)


def keep_priority(pos: Tensor, score: Tensor, lo: Tensor, hi: Tensor, by_score: Tensor) -> Tensor:
    """Keep-priority of slots at positions ``pos`` ``[B, H, N]``: ``inf`` if ``pos < lo`` or ``pos >= hi``
    (``[B, H]`` or broadcastable), else ``score`` where ``by_score`` (``[H]`` bool) and the position elsewhere."""
    key = torch.where(by_score.view(1, -1, 1), score, pos.to(torch.float32))
    protected = (pos < lo[..., None]) | (pos >= hi[..., None])
    return torch.where(protected, INF, key)


# --------------------------------------------------------------------------------------------- references


def write_slot_reference(store: SlotStore, k_new: Tensor, v_new: Tensor, new_pos: int, qpos: Tensor) -> None:
    """Step 1: k_new ``[B, Hkv, D]``, v_new ``[B, Hkv, Dv]`` into slot ``free``; ``qpos`` ``[B]`` := new_pos."""
    b, h = store.live.shape
    slot = store.free.view(b, h, 1)
    store.k.scatter_(2, slot[..., None].expand(b, h, 1, store.k.shape[-1]), k_new[:, :, None].to(store.k.dtype))
    store.v.scatter_(2, slot[..., None].expand(b, h, 1, store.v.shape[-1]), v_new[:, :, None].to(store.v.dtype))
    store.pos.scatter_(2, slot, new_pos)
    store.score.scatter_(2, slot, 0.0)
    store.live.add_(1)
    qpos.fill_(new_pos)


def slot_bias(pos: Tensor, row: Tensor | None, offset: int, masked_below: float, query_heads: int) -> Tensor:
    """The additive bias of every slot, ``[B, 1|Hq, C]`` float32 (``-inf``: not attended), from the mask row
    ``[B|1, 1|Hq, Tk]`` read at each slot's position."""
    b, h, c = pos.shape
    column = pos - offset
    present = (pos >= 0) & (column >= 0)
    if row is None:  # per query head: a KV head's slots, for each of its query heads
        bias = torch.zeros(b, h, c, device=pos.device).masked_fill(~present, -INF)
        return bias.repeat_interleave(query_heads // h, dim=1) if h > 1 else bias
    tk = row.shape[-1]
    heads = row.shape[1]
    index = column.clamp(0, tk - 1)
    if heads > 1:  # a per-query-head row (ALiBi): each query head reads its KV head's slots
        index, present = (t.repeat_interleave(query_heads // h, dim=1) for t in (index, present))
    values = row.expand(b, heads, tk).gather(2, index if heads > 1 else index.view(b, 1, h * c))
    values = values.view(b, -1, c) if heads > 1 else values.view(b, h, c)
    if row.dtype == torch.bool:
        attended = present & values
        values = torch.zeros_like(values, dtype=torch.float32)
    else:
        values = values.float()
        attended = present & (values > masked_below)
    return values.masked_fill(~attended, -INF)


def slot_decode_step_reference(
    q: Tensor,  # [B, Hq, D]
    store: SlotStore,
    rule: EvictionRule,
    *,
    seen: int,
    scale: float,
    softcap: float = 0.0,
    mask_row: Tensor | None = None,  # [B|1, 1|Hq, Tk] bool or float
    mask_offset: int = 0,
    masked_below: float = -INF,
    gumbel: GumbelScores | None = None,
    qpos: Tensor | None = None,  # [B] int64 (Gumbel noise)
    accumulate: bool = True,
    keys: Tensor | None = None,  # attend over these keys instead of store.k (same layout)
) -> Tensor:  # [B, Hq, Dv]
    """Steps 2 and 3 in plain torch (float32 arithmetic): the ground truth of :func:`slot_decode_step`."""
    b, hq, _ = q.shape
    h, c = store.pos.shape[1], store.pos.shape[2]
    bias = slot_bias(store.pos, mask_row, mask_offset, masked_below, hq)
    out, contribution = scored_decode_attention_reference(
        q, store.k if keys is None else keys, store.v, bias, scale=scale, softcap=softcap, gumbel=gumbel,
        qpos=qpos, kpos=store.pos)
    if accumulate:
        store.score.add_(torch.where(store.pos >= 0, contribution, 0.0))
    first_head = bias[:, :: hq // h] if bias.shape[1] == hq else bias  # [B, 1|Hkv, C]: each group's first head
    attended = first_head.expand(b, h, c) > -INF
    hi = rule.hi + seen * rule.from_seen.to(rule.hi.dtype).view(1, h)
    key = keep_priority(store.pos, store.score, rule.lo, hi, rule.by_score)
    key = torch.where(attended, key, -INF)
    live = store.pos >= 0
    key = torch.where(live, key, INF)
    tie = torch.where(live, store.pos, _BIG)
    lowest = key.amin(dim=-1, keepdim=True)
    victim = torch.where(key == lowest, tie, _BIG).argmin(dim=-1)  # [B, Hkv]: the oldest of the lowest
    over = store.live > rule.budget
    first_empty = torch.where(live, _BIG, torch.arange(c, device=live.device)).amin(dim=-1)
    kept = store.pos.gather(2, victim[..., None])
    store.pos.scatter_(2, victim[..., None], torch.where(over[..., None], -1, kept))
    store.live.sub_(over.long())
    store.free.copy_(torch.where(over, victim, first_empty.clamp(max=c)))
    return out


# --------------------------------------------------------------------------------------------- Triton


def _write_slot_kernel(
    K, V, Pos, Score, Live, Free, Knew, Vnew, Qpos, Seen,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_nkb, stride_nkh, stride_nvb, stride_nvh,
    Hkv, C, new_pos,
    HEAD_DIM: tl.constexpr,
    HEAD_DV: tl.constexpr,
    SEEN_IN_MEMORY: tl.constexpr = False,  # new_pos is Seen[0] (a device counter the evict kernel advances)
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hkv
    h = bh % Hkv
    if SEEN_IN_MEMORY:
        position = tl.load(Seen)
    else:
        position = new_pos.to(tl.int64)
    slot = tl.load(Free + bh)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DV)
    k = tl.load(Knew + b * stride_nkb + h * stride_nkh + offs_d)
    tl.store(K + b * stride_kb + h * stride_kh + slot * stride_kn + offs_d, k.to(K.dtype.element_ty))
    v = tl.load(Vnew + b * stride_nvb + h * stride_nvh + offs_dv)
    tl.store(V + b * stride_vb + h * stride_vh + slot * stride_vn + offs_dv, v.to(V.dtype.element_ty))
    tl.store(Pos + bh * C + slot, position)
    tl.store(Score + bh * C + slot, 0.0)
    tl.store(Live + bh, tl.load(Live + bh) + 1)
    tl.store(Qpos + b, position, mask=h == 0)


def _evict_kernel(
    PartKey, PartPos, PartSlot, PartFree, Pos, Live, Budget, Free, Seen,
    C, part_stride, blocks,
    BLOCK: tl.constexpr,
    STATIC_ITERS: tl.constexpr,  # > 0 (interpreter only): constexpr trip count
    ADVANCE_SEEN: tl.constexpr = False,  # the step's last kernel counts the token it wrote: Seen[0] += 1
):
    BIG: tl.constexpr = 2**62
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    best_key = tl.full([BLOCK], float("inf"), tl.float32)
    best_pos = tl.full([BLOCK], BIG, tl.int64)
    best_slot = tl.full([BLOCK], BIG, tl.int64)
    first_free = tl.full([BLOCK], BIG, tl.int64)
    for it in range(0, STATIC_ITERS if STATIC_ITERS > 0 else (blocks + BLOCK - 1) // BLOCK):
        idx = it * BLOCK + offs
        ok = idx < blocks
        key = tl.load(PartKey + bh * part_stride + idx, mask=ok, other=float("inf"))
        pos = tl.load(PartPos + bh * part_stride + idx, mask=ok, other=BIG)
        slot = tl.load(PartSlot + bh * part_stride + idx, mask=ok, other=BIG)
        better = (key < best_key) | ((key == best_key) & (pos < best_pos))
        best_key = tl.where(better, key, best_key)
        best_pos = tl.where(better, pos, best_pos)
        best_slot = tl.where(better, slot, best_slot)
        first_free = tl.minimum(first_free, tl.load(PartFree + bh * part_stride + idx, mask=ok, other=BIG))
    lowest = tl.reduce(best_key, 0, _sda._MIN)
    oldest = tl.reduce(tl.where(best_key == lowest, best_pos, BIG), 0, _sda._MIN)
    victim = tl.reduce(tl.where((best_key == lowest) & (best_pos == oldest), best_slot, BIG), 0, _sda._MIN)
    live = tl.load(Live + bh)
    over = live > tl.load(Budget + bh)
    tl.store(Pos + bh * C + victim, -1, mask=over)
    tl.store(Live + bh, live - over.to(tl.int64))
    empty = tl.minimum(tl.reduce(first_free, 0, _sda._MIN), C)
    tl.store(Free + bh, tl.where(over, victim, empty))
    if ADVANCE_SEEN:
        tl.store(Seen, tl.load(Seen) + 1, mask=bh == 0)  # nothing else of this kernel reads Seen


_WRITE_JIT = JITFunction(_write_slot_kernel, do_not_specialize=["Hkv", "C", "new_pos"])
_EVICT_JIT = JITFunction(_evict_kernel, do_not_specialize=["C", "part_stride", "blocks"])


def _interpret(t: Tensor) -> bool:
    return t.device.type != "cuda" or _da.triton_interpreting()


def write_slot(store: SlotStore, k_new: Tensor, v_new: Tensor, new_pos: int, qpos: Tensor,
               counter: Tensor | None = None) -> None:
    """Step 1 (one Triton launch): :func:`write_slot_reference`. k_new/v_new need a contiguous last dim;
    pos, score, live and free must be contiguous. ``counter``: a ``[1]`` int64 device tensor holding ``new_pos``,
    read instead of the argument (and advanced by :func:`slot_decode_step` given the same counter), so that a step
    captured in a CUDA graph writes the right position at every replay."""
    b, h, c, d = store.k.shape
    dv = store.v.shape[-1]
    kernel = _da._interpreted(_write_slot_kernel) if _interpret(k_new) else _WRITE_JIT
    kernel[(b * h,)](
        store.k, store.v, store.pos, store.score, store.live, store.free, k_new, v_new, qpos,
        counter if counter is not None else qpos,
        store.k.stride(0), store.k.stride(1), store.k.stride(2), store.v.stride(0), store.v.stride(1),
        store.v.stride(2), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        h, c, int(new_pos), HEAD_DIM=d, HEAD_DV=dv, SEEN_IN_MEMORY=counter is not None, num_warps=1,
    )


def slot_decode_step(
    q: Tensor,
    store: SlotStore,
    rule: EvictionRule,
    *,
    seen: int,
    scale: float,
    softcap: float = 0.0,
    mask_row: Tensor | None = None,
    mask_offset: int = 0,
    masked_below: float = -INF,
    gumbel: GumbelScores | None = None,
    qpos: Tensor | None = None,
    accumulate: bool = True,
    keys: Tensor | None = None,
    num_splits: int | None = None,
    scratch: _sda.Scratch | None = None,
    counter: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Steps 2 and 3 in three Triton launches: :func:`slot_decode_step_reference` (arguments alike). ``scratch``:
    the caller's work buffers, reused from step to step (a slot store keeps its shapes). ``counter``: the device
    counter :func:`write_slot` read (``seen - 1``), read here instead of ``seen`` and advanced by one. ``out``: the
    ``[B, Hq, Dv]`` buffer to write the output into (a CUDA graph's static output)."""
    b, hq, _ = q.shape
    h, c = store.pos.shape[1], store.pos.shape[2]
    if mask_row is not None:
        mask_row = mask_row.expand(b, mask_row.shape[1], mask_row.shape[2])
    from_seen, by_score = rule.flags_int8
    out, partials = _sda.launch(
        q, store.k if keys is None else keys, store.v, None, store.score, scale=scale, softcap=softcap,
        gumbel=gumbel, qpos=qpos, kpos=store.pos, num_splits=num_splits,
        slot_mask=_sda.SlotMask(mask_row, mask_offset, masked_below),
        evict=_sda.SlotEviction(rule.lo, rule.hi, from_seen, by_score, seen, accumulate, counter), scratch=scratch,
        out=out)
    if partials is None:
        if counter is not None:
            counter.add_(1)
        return out
    part_key, part_pos, part_slot, part_free, blocks = partials
    interpret = _interpret(q)
    block = 32 if interpret else max(16, min(256, triton.next_power_of_2(blocks)))
    kernel = _da._interpreted(_evict_kernel) if interpret else _EVICT_JIT
    kernel[(b * h,)](
        part_key, part_pos, part_slot, part_free, store.pos, store.live, rule.budget, store.free,
        counter if counter is not None else store.live,
        c, part_key.shape[1], blocks,
        BLOCK=block, STATIC_ITERS=-(-blocks // block) if interpret else 0, ADVANCE_SEEN=counter is not None,
        num_warps=1,
    )
    return out
