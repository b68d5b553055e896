"""Eviction and quantization together: the eviction policy decides which tokens are attended, KIVI/GEAR stores them.

``evict: {method: h2o, budget: 0.5}`` with ``quantize: {method: kivi, bits: 4}`` keeps H2O's budget of tokens per
(row, KV head) exactly as :class:`~kvfx.eviction.slot_cache.EvictingLayerCache` does (same prompt selection, same
decode rule, same scores), and stores the kept tokens quantized by a :class:`~kvfx.quantization.base.
QuantizedLayerCache` with its streaming schedule (KIVI/GEAR: the most recent tokens at full precision, then whole
key blocks and value tokens quantized once).

The quantized store is a *sequence of slots*: the prompt's kept tokens in position order (per row and head the
same count; a row that keeps fewer, e.g. padding, has dead slots), then one slot per decode token. Quantized slots
cannot be rewritten (a key group shares its scales with its neighbours), so an evicted slot is not reused: it is
marked dead (``pos == -1``) and never attended again, and the next token takes a new slot at the end. Hence:

- attention semantics are the eviction policy's exactly (the live slots are at most ``budget + 1`` during a step,
  ``budget`` after it), over the quantized tokens;
- memory: the prompt costs its budget, quantized; each decode token then adds one quantized slot (as KIVI alone
  does), whether or not it is later evicted. For the decode lengths eviction is used with (new tokens << prompt)
  this is a small term; bounded memory under long generation would need compaction, which this cache does not do.

Decode runs in torch on every device (the slots are dequantized in float32, then the slot-store reference step
:func:`~kvfx.kernels.slot_decode.slot_decode_step_reference` attends, accumulates scores and evicts): there is no
fused kernel for scored attention over quantized slots yet, and CUDA says so once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvfx.eviction.base import EvictionPolicy
from kvfx.eviction.layer_inputs import decode_mask_row
from kvfx.eviction.slot_cache import GROWTH_CHUNK, EvictingLayerCache
from kvfx.kernels.slot_decode import SlotStore, slot_decode_step_reference
from kvfx.notices import warn_once
from kvfx.quantization.base import QuantizedLayerCache, reconstruct
from kvfx.state import KvfxCacheError


class QuantizedEvictingLayerCache(EvictingLayerCache):
    """An :class:`EvictingLayerCache` whose kept tokens live in ``quantized`` (module docstring)."""

    def __init__(self, layer: int, policies: Sequence[EvictionPolicy | None], quantized: QuantizedLayerCache,
                 keep_last: int = 0):
        super().__init__(layer, policies, keep_last)
        methods = ", ".join(sorted({p.config.describe() for p, _ in self.groups}))
        if keep_last:
            raise KvfxCacheError(f"layer {layer}: eviction ({methods}) with quantization on a sliding-window layer is "
                                 "not supported; give sliding-window layers one of the two (per-layer overrides)")
        if self.compact_heads is not None:
            raise KvfxCacheError(f"layer {layer}: window eviction with positions: compact re-rotates kept keys every "
                                 "step, which quantized keys cannot follow; use positions: original with quantization")
        self.quantized = quantized
        self.slots = 0  # slots written: the kept prompt tokens, then one per decode token

    # ---- sizes ----------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 0 if self.pos is None else self.pos.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the quantized store and residual buffers, positions and scores of every slot."""
        if self.pos is None:
            return 0
        return self.quantized.nbytes + sum(t.numel() * t.element_size() for t in (self.pos, self.score))

    @property
    def used_bytes(self) -> int:
        """Bytes of the written slots (dead ones included: their quantized codes stay): the quantized tokens, the
        residual tokens, and each slot's position and score."""
        if self.pos is None:
            return 0
        b, h = self.live.shape
        return self.quantized.used_bytes + b * h * self.slots * (self.pos.element_size() + self.score.element_size())

    # ---- prefill --------------------------------------------------------------------------------

    def compress_prompt(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float,
                        softcap: float, is_causal: bool) -> None:
        """Select each row's and head's budget as the evicting cache does, then quantize the kept slots."""
        super().compress_prompt(q, k, v, mask, scale=scale, softcap=softcap, is_causal=is_causal)
        kept = min(self.k.shape[2] - 1, k.shape[2])  # the slots the selection filled (the last one is spare)
        self.quantized.compress_prompt(None, self.k[:, :, :kept], self.v[:, :, :kept], None)
        self.k = self.v = None  # the full-precision slots are gone: the quantized store holds the kept tokens
        self.slots = kept
        self.pos, self.score = self.pos[:, :, :kept].clone(), self.score[:, :, :kept].clone()

    # ---- decode ---------------------------------------------------------------------------------

    def decode(self, q: Tensor, k_new: Tensor, v_new: Tensor, mask: Tensor | None, *, scale: float,
               softcap: float, inv_freq: Tensor | None = None) -> Tensor:
        """One decode step: q ``[B, Hq, 1, D]``, k_new/v_new ``[B, Hkv, 1, D]`` -> ``[B, Hq, 1, Dv]``. The new token
        takes a new slot, every live slot is attended (dequantized), scores accumulate, then a slot over budget is
        marked dead; the quantized cache then flushes by its own schedule."""
        if self.pos is None:
            raise KvfxCacheError(f"layer {self.layer}: decode before the prompt")
        if q.is_cuda:
            warn_once("kvfx: eviction with quantization runs in torch (the kept slots are dequantized every step; "
                      "there is no fused kernel for it yet)")
        self.quantized.append_token(k_new, v_new)
        slot = self.slots
        if slot == self.capacity:
            self._grow_slots()
        self.slots += 1
        self.pos[:, :, slot] = self.seen
        self.score[:, :, slot] = 0.0
        self.live += 1
        self.qpos.fill_(self.seen)
        self.seen += 1
        if self.rule is None:
            self.rule = self._decode_rule(seen=self.seen)

        keys, values = reconstruct(self.quantized.decode_inputs())  # [B, Hkv, slots, D] float32
        store = SlotStore(keys, values, self.pos[:, :, : self.slots], self.score[:, :, : self.slots], self.live,
                          self.free)
        row, masked_below = decode_mask_row(mask)
        out = slot_decode_step_reference(
            q[:, :, 0], store, self.rule, seen=self.seen, scale=scale, softcap=softcap, mask_row=row,
            mask_offset=0 if mask is None else self.seen - mask.shape[-1], masked_below=masked_below,
            gumbel=self.scorer.gumbel(self._context(self.scorer, [])) if self.scorer is not None else None,
            qpos=self.qpos, accumulate=self.scorer is not None)
        self.quantized.flush()
        return out.to(q.dtype).unsqueeze(2)

    def _grow_slots(self) -> None:
        b, h, c = self.pos.shape
        extra = -(-max(1, c // 8) // GROWTH_CHUNK) * GROWTH_CHUNK
        self.pos = torch.cat([self.pos, self.pos.new_full((b, h, extra), -1)], dim=2)
        self.score = torch.cat([self.score, self.score.new_zeros(b, h, extra)], dim=2)
