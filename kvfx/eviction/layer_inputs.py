"""What one layer's cache reads from the attention inputs transformers passes: which prompt columns are real tokens,
the new query's mask row, and the shape checks of a decode step. Shared by the slot cache and the ragged cache."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvfx.state import KvfxCacheError


def check_decode_batch(layer: int, k_new: Tensor, rows: int, heads: int) -> None:
    """Raise KvfxCacheError unless the new keys ``[B, Hkv, 1, D]`` fit a cache of ``rows`` x ``heads``."""
    if tuple(k_new.shape[:2]) != (rows, heads):
        raise KvfxCacheError(
            f"layer {layer}: new keys of shape {tuple(k_new.shape)} do not fit the cache of {rows} rows x {heads} "
            "KV heads: the batch changed under kvfx (beam search and cache reordering are not supported)"
        )


def decode_mask_row(mask: Tensor | None) -> tuple[Tensor | None, float]:
    """The new query's mask row ``[B|1, 1|Hq, Tk]`` (None without a mask) and the float value at or below which an
    entry masks its column (half the dtype's minimum; bool masks: unused)."""
    if mask is None:
        return None, -math.inf
    row = mask[:, :, -1, :]
    return row, (-math.inf if row.dtype == torch.bool else torch.finfo(row.dtype).min / 2)


def real_columns(mask: Tensor | None, batch: int, length: int, device, *, sliding: bool) -> Tensor:
    """``[B, T]``: which prompt positions are real tokens rather than padding. Padding is masked for every query;
    in a sliding-window layer the last query also misses the tokens before its window, so every row is read."""
    if not sliding:
        return attendable_columns(mask, batch, length, device)
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    seen = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    return seen.any(dim=-2).expand(batch, length)


def attendable_columns(mask: Tensor | None, batch: int, length: int, device) -> Tensor:
    """``[B, T]``: which prompt positions the last prompt query may attend (False = padding)."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    last = mask[:, 0, -1, :]
    if last.dtype != torch.bool:
        last = last > torch.finfo(last.dtype).min / 2
    return last.expand(batch, length)
