"""A boolean attention mask held as the AND of its small factors, and rebuilt only where it is read.

transformers builds a prompt's SDPA mask in the compiled graph as ``causal(q, kv) & padding[b, kv]`` broadcast to
``[B, 1, Tq, Tk]``: 8 GiB of bools at B=8, T=32768, and inductor realised three copies of it for kvfx's ops (seen on
an H100 with the 1B-shaped model: 24 of the prefill's 43 GiB above the weights). The graph pass
(:mod:`kvfx.passes.factor_mask`) hands ``kvfx::attention`` the factors instead, each broadcastable to the mask:

- ``mask``: a bool tensor (the padding rows ``[B, 1, 1, Tk]``, a constant);
- ``le`` / ``lt`` / ``ge`` / ``gt``: a comparison of two integer tensors, e.g. ``kv_index <= q_index`` with
  ``[1, 1, 1, Tk]`` and ``[1, 1, Tq, 1]`` operands: the causal mask, never materialised.

This module rebuilds rows of the mask from the factors and recognises the plain causal mask (no padding, no window),
for which prefill needs no mask tensor at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("mask", "le", "lt", "ge", "gt")  # the factor kinds, by their index in kvfx::attention's mask_kinds
_COMPARE = {1: torch.le, 2: torch.lt, 3: torch.ge, 4: torch.gt}
CHECK_CHUNK = 2**28  # mask entries compared per step when checking for the causal mask (256 MiB of bools)


@dataclass(frozen=True)
class MaskFactors:
    """The mask ``AND(factors)``; ``tensors`` holds one tensor per ``mask`` factor and two per comparison."""

    tensors: tuple[Tensor, ...]
    kinds: tuple[int, ...]

    @classmethod
    def parse(cls, tensors: list[Tensor], kinds: list[int]) -> MaskFactors | None:
        """The factors as the op receives them; None when there are none (the op's mask is a plain tensor)."""
        if not kinds:
            if tensors:
                raise ValueError(f"kvfx: {len(tensors)} mask factor tensors but no factor kinds")
            return None
        bad = [k for k in kinds if not 0 <= k < len(KINDS)]
        if bad:
            raise ValueError(f"kvfx: unknown mask factor kinds {bad} (known: {dict(enumerate(KINDS))})")
        needed = sum(1 if k == 0 else 2 for k in kinds)
        if needed != len(tensors):
            raise ValueError(f"kvfx: mask factors {[KINDS[k] for k in kinds]} take {needed} tensors, "
                             f"got {len(tensors)}")
        for t in tensors:
            if t.dim() > 4:
                raise ValueError(f"kvfx: a mask factor of shape {tuple(t.shape)} has more than 4 dimensions")
        return cls(tuple(tensors), tuple(kinds))

    def rows(self, start: int, end: int) -> Tensor:
        """Query rows ``start:end`` of the mask, as a bool tensor broadcastable to ``[B, H, end - start, Tk]``
        (a dimension the factors do not vary along stays 1)."""
        result, i = None, 0
        for kind in self.kinds:
            if kind == 0:
                factor = _query_rows(self.tensors[i], start, end).to(torch.bool)
                i += 1
            else:
                a, b = _query_rows(self.tensors[i], start, end), _query_rows(self.tensors[i + 1], start, end)
                factor = _COMPARE[kind](a, b)
                i += 2
            result = factor if result is None else result & factor
        return result

    def materialize(self, batch: int, queries: int) -> Tensor:
        """The whole mask, ``[B, 1|H, Tq, Tk]`` bool (a view where the factors repeat)."""
        mask = self.rows(0, queries)
        return mask.expand(batch, mask.shape[1], queries, mask.shape[3])

    def is_plain_causal(self, batch: int, length: int) -> bool:
        """Whether the mask of a ``length``-token prompt is exactly the causal one (query i sees keys 0..i): no
        padding, no window, nothing else masked. Compared in chunks of query rows (one host sync per chunk)."""
        probe = self.rows(0, 1)
        if probe.shape[0] not in (1, batch) or probe.shape[-1] not in (1, length):
            return False
        device = probe.device
        step = max(1, CHECK_CHUNK // max(batch * length, 1))
        keys = torch.arange(length, device=device)
        for start in range(0, length, step):
            end = min(start + step, length)
            want = keys <= torch.arange(start, end, device=device)[:, None]  # [rows, T]
            if not bool((self.rows(start, end) == want).all()):
                return False
        return True

    def key(self) -> tuple:
        """Identifies these factor tensors (storage and layout) for memoising :meth:`is_plain_causal` within one
        sequence's prefill, while the graph keeps them alive and unchanged (inference tensors have no version
        counter to add)."""
        return self.kinds, tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for t in self.tensors)


def _query_rows(t: Tensor, start: int, end: int) -> Tensor:
    """``t`` as 4 dims, cut to the query rows ``start:end`` where it varies along them."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t if t.shape[2] == 1 else t[:, :, start:end]
