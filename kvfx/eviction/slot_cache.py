"""The fixed-budget KV cache of one attention layer under eviction.

Per (row, KV head) a preallocated store of ``capacity`` slots, each with its key, value, original cache position
and running score (``pos == -1``: an empty slot). Capacity is the largest budget plus one spare slot, so memory is
fixed after the prompt however long generation runs::

    k: [B, Hkv, C, D]   v: [B, Hkv, C, Dv]   pos: [B, Hkv, C] int64   score: [B, Hkv, C] float32   live: [B, Hkv]

Keys are stored as transformers computed them (after RoPE, at their original positions), so attention needs no
position fix-up; masks and positional biases (ALiBi) are read at each slot's original position.

- Prefill: attention over the whole prompt happens outside (it is ordinary attention); ``compress_prompt`` scores
  the prompt (if the policy reads scores) and keeps each row's and head's top-``budget`` tokens by priority.
  Padding is never kept.
- Decode, one token (``kvfx.kernels.slot_decode``: Triton kernels on CUDA, their torch reference elsewhere): write it
  into the free slot, attend over the slots (each slot's score contribution comes out of the same pass over K),
  then, where a row and head hold more than their budget, empty the slot of lowest keep-priority (the policies'
  rules as tensors): O(capacity) per step, no compaction, no host sync. The kernels read the new token's position
  from a device counter, so after two eager steps the step is captured in a CUDA graph and replayed
  (kvfx.eviction.step_graph; Keyformer's temperature, which moves every step, is written to a device tensor the
  kernel reads; compact positions run eagerly).

A layer may mix policies across its KV heads (``None`` = keep everything; such a layer grows in chunks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from kvfx.eviction.base import INF, NEVER, EvictionContext, EvictionError, EvictionPolicy
from kvfx.eviction.layer_inputs import attendable_columns, check_decode_batch, decode_mask_row, real_columns
from kvfx.eviction.step_graph import CapturedStep
from kvfx.kernels.attention_scores import attention_column_scores, attention_column_scores_reference
from kvfx.kernels.attention_scores import supports as column_scores_supports
from kvfx.kernels.scored_decode_attention import GumbelScores, Scratch
from kvfx.kernels.scored_decode_attention import supports as scored_decode_supports
from kvfx.kernels.slot_decode import EvictionRule, SlotStore, slot_decode_step, slot_decode_step_reference
from kvfx.kernels.slot_decode import write_slot, write_slot_reference
from kvfx.notices import warn_once

GROWTH_CHUNK = 64  # slots added at a time to a layer whose heads keep everything
_UNBOUNDED = 2**62  # the budget of a head that keeps everything


class EvictingLayerCache:
    def __init__(self, layer: int, policies: Sequence[EvictionPolicy | None], keep_last: int = 0):
        self.layer = layer
        self.keep_last = keep_last
        self.groups: list[tuple[EvictionPolicy, list[int]]] = []  # each policy and the KV heads it rules
        for head, policy in enumerate(policies):
            if policy is None:
                continue
            for known, heads in self.groups:
                if known.config == policy.config:
                    heads.append(head)
                    break
            else:
                self.groups.append((policy, [head]))
        self.num_heads = len(policies)
        # Index the heads of a group by a slice when it rules them all: views, not gathers, on the decode path.
        self.groups = [(policy, slice(None) if len(heads) == len(policies) else heads) for policy, heads in self.groups]
        self.unbounded = any(policy is None for policy in policies)
        kinds = {policy.scores for policy, _ in self.groups if policy.scores}
        gumbels = {policy.config for policy, _ in self.groups if policy.scores == "gumbel"}
        if len(kinds) > 1 or len(gumbels) > 1:
            raise EvictionError(f"layer {layer}: KV heads of one layer use different attention scores "
                                f"({', '.join(sorted(p.config.describe() for p, _ in self.groups))}); "
                                "give them one scoring policy (or use per-layer overrides)")
        self.scorer = next((policy for policy, _ in self.groups if policy.scores), None)
        compact = [getattr(p.config, "positions", "original") == "compact" if p else False for p in policies]
        self.compact_heads = torch.tensor(compact) if any(compact) else None  # [Hkv] bool
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.pos: Tensor | None = None
        self.score: Tensor | None = None
        self.live: Tensor | None = None
        self.budget: Tensor | None = None  # [B, Hkv] int64
        self.recent: Tensor | None = None  # [B, Hkv] int64
        self.first_valid: Tensor | None = None  # [B]
        self.free: Tensor | None = None  # [B, Hkv] int64: the empty slot the next token is written to
        self.qpos: Tensor | None = None  # [B] int64: the position of the current query
        self.rule: EvictionRule | None = None  # the decode keep rules, made at the first decode step
        self.scratch = Scratch()  # the decode kernels' work buffers, reused from step to step
        self.counter: Tensor | None = None  # [1] int64 on the GPU: tokens written (the kernels' copy of `seen`)
        self.tau: Tensor | None = None  # [1] float32 on the GPU: Keyformer's temperature at this step
        self.captured: CapturedStep | None = None  # the decode step as a CUDA graph (kernels only)
        self.seen = 0  # tokens written, padding included (the cache length transformers believes in)
        self.prompt_end = 0

    # ---- sizes ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        """The cache length transformers reports for this layer (its sliding window, if any, applied)."""
        return min(self.seen, self.keep_last) if self.keep_last else self.seen

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated: keys, values, positions and scores of every slot."""
        if self.k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos, self.score))

    @property
    def used_bytes(self) -> int:
        """Bytes of the live slots."""
        if self.k is None:
            return 0
        return int(self.live.sum()) * self.nbytes // (self.k.shape[0] * self.k.shape[1] * self.capacity)

    def kept_positions(self) -> list[list[set[int]]]:
        """The cache positions kept, ``[row][kv head] -> set`` (for tests and tools; syncs with the device)."""
        pos = self.pos.cpu()
        return [[set(p[p >= 0].tolist()) for p in row] for row in pos]

    # ---- prefill --------------------------------------------------------------------------------

    def compress_prompt(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float,
                        softcap: float, is_causal: bool) -> None:
        """Keep each row's and KV head's budget of the prompt ``k``/``v`` ``[B, Hkv, T, D]`` (q: ``[B, Hq, T, D]``)."""
        if self.k is not None:
            raise EvictionError(f"layer {self.layer}: the prompt was already written to this cache")
        b, h, t, d = k.shape
        valid = real_columns(mask, b, t, k.device, sliding=self.keep_last > 0)  # [B, T]: not padding
        attendable = attendable_columns(mask, b, t, k.device)  # [B, T]: the last query can still see it
        self.first_valid = valid.to(torch.int8).argmax(dim=-1)
        prompt_tokens = valid.sum(dim=-1)
        self.prompt_end = self.seen = t
        self.budget = torch.full((b, h), _UNBOUNDED, dtype=torch.long, device=k.device)
        self.recent = torch.zeros((b, h), dtype=torch.long, device=k.device)
        capacity = 0
        for policy, heads in self.groups:
            budget = policy.budget(prompt_tokens, t)
            policy.check(budget, prompt_tokens)
            self.budget[:, heads] = budget[:, None]
            self.recent[:, heads] = policy.recent(budget)[:, None]
            capacity = max(capacity, policy.capacity(t))
        capacity = max(capacity, t) if self.unbounded else capacity
        capacity += 1  # the spare slot the next token is written to

        def column_scores(queries: Tensor, gumbel: GumbelScores | None) -> Tensor:
            rows = queries.shape[2]
            part = None if mask is None else mask[..., mask.shape[-2] - rows:, :] if mask.shape[-2] > 1 else mask
            return _column_scores(queries, k, scale=scale, mask=part, causal=is_causal, valid=valid,
                                  softcap=softcap, gumbel=gumbel)

        positions = torch.arange(t, device=k.device).expand(b, h, t)
        scores = torch.zeros(b, h, t, dtype=torch.float32, device=k.device)
        priority = torch.full((b, h, t), INF, device=k.device)
        for policy, heads in self.groups:
            ctx = self._context(policy, heads)
            found = policy.prompt_scores(column_scores, q, k, ctx)
            if found is not None:
                scores[:, heads] = found[:, heads]
            priority[:, heads] = policy.priority(positions[:, heads], scores[:, heads], ctx)
        priority = priority.masked_fill(~(valid & attendable)[:, None, :], -INF)

        # The budget's best, ties going to the more recent token: a stable sort over reversed positions.
        kept = min(capacity - 1, t)
        best, reversed_index = priority.flip(-1).sort(dim=-1, descending=True, stable=True)
        best, top_index = best[..., :kept], (t - 1) - reversed_index[..., :kept]  # [B, Hkv, kept]
        keep = (torch.arange(kept, device=k.device) < self.budget[..., None]) & (best > -INF)
        index, order = top_index.sort(dim=-1)  # slots in position order
        keep = keep.gather(-1, order)
        self.k = k.new_zeros(b, h, capacity, d)
        self.v = v.new_zeros(b, h, capacity, v.shape[-1])
        self.k[:, :, :kept] = k.gather(2, index[..., None].expand(b, h, kept, d))
        self.v[:, :, :kept] = v.gather(2, index[..., None].expand(b, h, kept, v.shape[-1]))
        self.pos = torch.full((b, h, capacity), -1, dtype=torch.long, device=k.device)
        self.pos[:, :, :kept] = torch.where(keep, index, -1)
        self.score = torch.zeros(b, h, capacity, dtype=torch.float32, device=k.device)
        self.score[:, :, :kept] = torch.where(keep, scores.gather(-1, index), 0.0)
        self.live = keep.sum(dim=-1)
        self.free = (self.pos < 0).to(torch.int8).argmax(dim=-1)  # capacity > budget: there is one
        self.qpos = torch.zeros(b, dtype=torch.long, device=k.device)

    # ---- decode ---------------------------------------------------------------------------------

    def decode(self, q: Tensor, k_new: Tensor, v_new: Tensor, mask: Tensor | None, *, scale: float,
               softcap: float, inv_freq: Tensor | None = None) -> Tensor:
        """One decode step: q ``[B, Hq, 1, D]``, k_new/v_new ``[B, Hkv, 1, D]`` -> attention output ``[B, Hq, 1, Dv]``."""
        if self.k is None:
            raise EvictionError(f"layer {self.layer}: decode before the prompt")
        b, h = self.live.shape
        check_decode_batch(self.layer, k_new, b, h)
        if self.unbounded and self.seen >= self.capacity:
            self._grow(self.seen + 1)
        store = SlotStore(self.k, self.v, self.pos, self.score, self.live, self.free)
        query = q[:, :, 0]
        fast = _kernels_run(query, self.k, self.v)
        if self.rule is None:
            self.rule = self._decode_rule(seen=self.seen + 1)  # as the step sees it, with the new token
        row, masked_below = decode_mask_row(mask)
        mask_offset = 0 if mask is None else self.seen + 1 - mask.shape[-1]
        common = dict(scale=scale, softcap=softcap, mask_offset=mask_offset, masked_below=masked_below,
                      qpos=self.qpos, accumulate=self.scorer is not None)
        if fast:
            if self.counter is None:  # the kernels read the position of the new token from the device
                self.counter = torch.full((1,), self.seen, dtype=torch.long, device=self.k.device)
            common.update(scratch=self.scratch, counter=self.counter)
        if not fast or self.compact_heads is not None:  # no replay: arguments that change every step
            if fast:
                write_slot(store, k_new[:, :, 0], v_new[:, :, 0], self.seen, self.qpos, counter=self.counter)
            else:
                write_slot_reference(store, k_new[:, :, 0], v_new[:, :, 0], self.seen, self.qpos)
            self.seen += 1
            keys = None
            if self.compact_heads is not None:
                query, keys = self._compact_positions(query, inv_freq)
            attend = slot_decode_step if fast else slot_decode_step_reference
            return attend(query, store, self.rule, seen=self.seen, mask_row=row, keys=keys, gumbel=self._gumbel(),
                          **common).unsqueeze(2)

        seen, qpos, counter, rule, gumbel = self.seen, self.qpos, self.counter, self.rule, self._gumbel_on_device()

        # (reads no attribute of self: self.captured keeps the step, and a closure over self would make a reference
        # cycle that keeps this cache's memory until Python's cyclic collector runs, past the next prompt's peak)
        def step(query: Tensor, k1: Tensor, v1: Tensor, row: Tensor | None, out: Tensor | None = None) -> Tensor:
            write_slot(store, k1, v1, seen, qpos, counter=counter)
            return slot_decode_step(query, store, rule, seen=seen + 1, mask_row=row, gumbel=gumbel, out=out, **common)

        if self.captured is None:
            self.captured = CapturedStep(step)
        self.captured.step = step  # eager steps and a new capture run this step's arguments
        # what a replay reuses: the store's buffers (a growing store gets new ones) and the step's scalars
        out = self.captured(query, k_new[:, :, 0], v_new[:, :, 0], row,
                            key=(self.k.data_ptr(), self.capacity, scale, softcap, mask_offset, masked_below))
        self.seen += 1
        return out.unsqueeze(2)

    def _gumbel(self, seen: int | None = None) -> GumbelScores | None:
        """Keyformer's noise parameters at the step ``seen`` counts the new token of (default: ``self.seen``, once
        it does); None for other scores."""
        return self.scorer.gumbel(self._context(self.scorer, [], seen=seen)) if self.scorer is not None else None

    def _gumbel_on_device(self) -> GumbelScores | None:
        """Keyformer's noise parameters for the step about to run, with the temperature (which moves every step)
        written to a device tensor the kernel reads, so that a replayed step sees this step's value; None for other
        scores."""
        if self.scorer is None or self.scorer.scores != "gumbel":
            return None
        gumbel = self._gumbel(seen=self.seen + 1)
        if self.tau is None:
            self.tau = torch.empty(1, dtype=torch.float32, device=self.k.device)
        self.tau.fill_(gumbel.tau)
        return dataclasses.replace(gumbel, tau=self.tau)

    def _decode_rule(self, seen: int) -> EvictionRule:
        """Every head's keep rule for the decode steps, as tensors ``[B, Hkv]`` (constant from the first step on:
        a rule moves with the length only through ``from_seen``), made at the first step's ``seen``."""
        b, h = self.live.shape
        device = self.pos.device
        lo = torch.zeros(b, h, dtype=torch.long, device=device)
        hi = torch.full((b, h), NEVER, dtype=torch.long, device=device)
        from_seen = torch.zeros(h, dtype=torch.bool, device=device)
        by_score = torch.zeros(h, dtype=torch.bool, device=device)
        for policy, heads in self.groups:
            rule = policy.rule(self._context(policy, heads, seen=seen))
            lo[:, heads] = rule.protect_below.view(b, 1)
            hi[:, heads] = rule.protect_from.view(b, 1)
            from_seen[heads] = rule.from_seen
            by_score[heads] = rule.by_score
        return EvictionRule(self.budget, lo, hi, from_seen, by_score)

    def _compact_positions(self, query: Tensor, inv_freq: Tensor | None) -> tuple[Tensor, Tensor]:
        """StreamingLLM's positions within the cache: the query and the kept keys of compact heads rotated as if
        the kept tokens sat at positions 0, 1, ... in their order (the new token last). Keys are stored at the
        positions the model gave them (cache position - padding), so each is rotated by the difference."""
        if inv_freq is None:
            raise EvictionError(f"layer {self.layer}: positions: compact needs the keys' RoPE frequencies")
        b, h, c = self.pos.shape
        compact = self.compact_heads.to(self.pos.device).view(1, h, 1)
        live = self.pos >= 0
        order = torch.where(live, self.pos, _UNBOUNDED).argsort(dim=-1)
        rank = torch.empty_like(self.pos).scatter_(-1, order, torch.arange(c, device=self.pos.device).expand(b, h, c))
        model_pos = self.pos - self.first_valid.view(b, 1, 1)
        key_shift = torch.where(compact & live, rank - model_pos, 0)  # [B, Hkv, C]
        query_model_pos = (self.seen - 1) - self.first_valid.view(b, 1)
        query_shift = torch.where(compact[..., 0], (self.live - 1) - query_model_pos, 0)  # [B, Hkv]
        group = query.shape[1] // h
        query = rotate(query, query_shift.repeat_interleave(group, dim=1), inv_freq)
        return query, rotate(self.k, key_shift, inv_freq)

    def _grow(self, needed: int) -> None:
        capacity = -(-max(needed + 1, self.capacity + self.capacity // 8) // GROWTH_CHUNK) * GROWTH_CHUNK
        extra = capacity - self.capacity
        b, h = self.live.shape
        self.k = torch.cat([self.k, self.k.new_zeros(b, h, extra, self.k.shape[-1])], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(b, h, extra, self.v.shape[-1])], dim=2)
        self.pos = torch.cat([self.pos, self.pos.new_full((b, h, extra), -1)], dim=2)
        self.score = torch.cat([self.score, self.score.new_zeros(b, h, extra)], dim=2)

    def _context(self, policy: EvictionPolicy, heads, seen: int | None = None) -> EvictionContext:
        head = heads[0] if isinstance(heads, list) and heads else 0
        return EvictionContext(layer=self.layer, prompt_end=self.prompt_end,
                               seen=self.seen if seen is None else seen, first_valid=self.first_valid,
                               budget=self.budget[:, head], recent=self.recent[:, head])


def rotate(x: Tensor, shift: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate-half RoPE by ``shift`` positions: x ``[..., D]``, shift ``[...]`` int, inv_freq ``[D/2]`` (fp32 angles)."""
    angle = shift.unsqueeze(-1).to(torch.float32) * inv_freq.to(torch.float32)  # [..., D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)


def _column_scores(q, k, **kwargs) -> Tensor:
    """Column sums of the prompt's attention probabilities: the Triton kernel on CUDA, else the reference."""
    if q.is_cuda:
        reason = column_scores_supports(q, k)
        if reason is None:
            return attention_column_scores(q, k, **kwargs)
        warn_once(f"kvfx: prompt attention scores run the torch reference ({reason})")
    return attention_column_scores_reference(q, k, **kwargs)


def _kernels_run(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the decode step runs the Triton kernels (CUDA, supported shapes and dtypes) or the torch reference."""
    if not q.is_cuda:
        return False
    reason = scored_decode_supports(q, k, v)
    if reason is not None:
        warn_once(f"kvfx: the eviction decode step runs the torch reference ({reason})")
    return reason is None
