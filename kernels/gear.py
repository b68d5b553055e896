"""GEAR's terms beside the KIVI codes (a low-rank error term and exact sparse outliers): layout and torch references.

Compression of a block ``x: [B, H, T, C]`` of keys or values (:func:`gear_compress_reference`):

1. Outliers, per row: keys one channel of one group of ``group`` tokens, values one token's ``C`` channels.  The
   ``n = floor(outliers / 2 * row length)`` smallest and ``n`` largest entries by signed value (a stable sort: ties
   go to the lower index) are kept exactly and replaced, before quantizing, by the mean of the row's other entries
   (inside their range, so the outliers never widen it).  ``n`` is rounded down so the store never exceeds the
   requested fraction: at ``outliers = 0.02`` a key row of 32 tokens has none, a value row of 128 channels one each
   side.
2. KIVI quantization (:mod:`kvfx.kernels.quant_pack`) with ``2**bits - 1`` levels.  GEAR's released code passes
   ``bits**2 - 1`` as the number of levels, right only for 2 and 4 bits (8 bits would get 63 levels, not 255);
   this module never squares.
3. The error ``E = x - x^`` (0 at the outliers), per (sequence, head) a ``[T, C]`` matrix, is approximated as
   ``A B^T`` of rank ``r`` by power iteration: ``B`` starts as a fixed seeded normal ``[C, r]`` matrix; 3 iterations
   of ``A = E B; B = E^T A``, with ``A``'s columns normalised in the first two (the same subspace as plain power
   iteration, without overflow) and ``A = QR(A).Q`` in the last, so ``A [T, r]`` has orthonormal columns and
   ``A B^T = A A^T E`` is E projected on the found subspace.  ``A`` and ``B`` are stored in ``factor_dtype``.
4. Each outlier is stored as ``x - (A B^T)`` at its position, computed from the stored factors in float32: readers
   add the low-rank term everywhere and replace the outlier entries of ``x^`` by the stored value, so an outlier
   comes back as ``x`` up to float32 rounding.

:class:`GearTerms` layout, for one of keys / values (``Tcap`` the quantized token capacity, ``S`` segments):

    lr_a     [B, H, Tcap, r]        per quantized token (factor dtype; rows past the quantized tokens unused)
    lr_b     [B, H, S, C, r]        per segment: a separately compressed block (e.g. the prompt with prefill_rank,
                                    then each block of ``residual`` decode tokens with rank); columns past a
                                    segment's own rank are zero
    lr_seg   [B|1, H|1, cdiv(Tcap, lr_block)] int   the segment of each block of ``lr_block`` tokens (segments
                                    start and end on multiples of ``lr_block``)
    out_idx  keys   [B, H, Tcap // group, n_out, C] uint8: the outlier's token offset inside its group
             values [B, H, Tcap, n_out] uint8: the outlier's channel
    out_val  the shape of out_idx, float32: the stored value (step 4)

Reconstruction (:func:`gear_reconstruct`, the reference the decode kernel is held to):
``X^ = dequantize(codes) + A B_seg^T``, then ``X^[p] = out_val[p] + (A B_seg^T)[p]`` at every outlier ``p``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from kvfx.kernels.quant_pack import Quantized, check_quant_args, dequantize, quantize, quantize_reference

__all__ = ["GearTerms", "outlier_count", "gear_compress_reference", "gear_reconstruct", "concat_compressed",
           "POWER_ITERATIONS", "MAX_RANK"]

POWER_ITERATIONS = 3
MAX_RANK = 16  # the decode kernel pads the rank to one 16-wide tl.dot operand


class GearTerms(NamedTuple):
    """GEAR's low-rank and outlier terms for one of keys / values (layout in the module docstring); the low-rank
    fields (lr_*) or the outlier fields (out_*) may be None."""

    lr_a: Tensor | None
    lr_b: Tensor | None
    lr_seg: Tensor | None
    lr_block: int
    out_idx: Tensor | None
    out_val: Tensor | None

    @property
    def rank(self) -> int:
        return 0 if self.lr_a is None else self.lr_a.shape[-1]

    @property
    def n_out(self) -> int:
        if self.out_idx is None:
            return 0
        return self.out_idx.shape[-2] if self.out_idx.dim() == 5 else self.out_idx.shape[-1]

    def nbytes(self, tokens: int, group: int, kind: str) -> int:
        """Bytes these terms add for the first ``tokens`` quantized tokens of every head (segment factors whole)."""
        total = 0
        if self.lr_a is not None:
            lead = self.lr_a.shape[0] * self.lr_a.shape[1]
            total += lead * tokens * self.rank * self.lr_a.element_size()
            total += self.lr_b.numel() * self.lr_b.element_size()
            total += self.lr_seg.numel() * self.lr_seg.element_size()
        if self.out_idx is not None:
            lead = self.out_idx.shape[0] * self.out_idx.shape[1]
            rows = tokens // group if kind == "keys" else tokens
            per_row = self.out_idx[0, 0, 0].numel() if self.out_idx.shape[2] else 0
            total += lead * rows * per_row * (self.out_idx.element_size() + self.out_val.element_size())
        return total


def outlier_count(outliers: float, row_length: int) -> int:
    """Outliers kept at each end of a row of ``row_length`` entries: floor(outliers / 2 * row_length)."""
    if isinstance(outliers, bool) or not isinstance(outliers, (int, float)) or not 0.0 <= outliers < 0.5:
        raise ValueError(f"outliers must be a fraction in [0, 0.5), got {outliers!r}")
    return int(math.floor(outliers / 2 * row_length + 1e-9))


def _rows(x: Tensor, kind: str, group: int) -> Tensor:
    """x [B, H, T, C] -> rows [..., row length] (keys: [B, H, T // group, C, group]; values: x itself)."""
    if kind == "keys":
        B, H, T, C = x.shape
        return x.reshape(B, H, T // group, group, C).transpose(-1, -2)
    return x


def _unrows(rows: Tensor, kind: str, shape) -> Tensor:
    if kind == "keys":
        return rows.transpose(-1, -2).reshape(shape)
    return rows


def _power_iteration(E: Tensor, rank: int, iters: int, seed: int) -> tuple[Tensor, Tensor]:
    """E [B, H, T, C] float32 -> A [B, H, T, rank] (orthonormal columns), B [B, H, C, rank] = E^T A."""
    B_, H, T, C = E.shape
    r = min(rank, T, C)
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(C, r, generator=gen).to(E.device).expand(B_, H, C, r)
    a = E.new_zeros(B_, H, T, r)
    for i in range(iters):
        a = E @ b
        if i < iters - 1:
            a = a / a.norm(dim=-2, keepdim=True).clamp_min(1e-30)
        else:
            a = torch.linalg.qr(a).Q
        b = E.transpose(-1, -2) @ a
    if r < rank:  # pad to the requested rank with zero columns
        a = torch.cat([a, a.new_zeros(B_, H, T, rank - r)], -1)
        b = torch.cat([b, b.new_zeros(B_, H, C, rank - r)], -1)
    return a, b


def gear_compress_reference(x: Tensor, kind: str, bits: int, group: int, rank: int, outliers: float, *,
                            scale_dtype: torch.dtype = torch.float16, factor_dtype: torch.dtype = torch.float16,
                            lr_block: int = 128, iters: int = POWER_ITERATIONS, seed: int = 0,
                            use_kernel: bool = False) -> tuple[Quantized, GearTerms]:
    """Compress one block ``x [B, H, T, C]`` (keys: T a multiple of group) as GEAR; one low-rank segment.

    ``rank`` 0 gives no low-rank term, ``outliers`` 0 (or rows too short to hold one) no outliers.
    ``use_kernel`` quantizes with the Triton kernel instead of the torch reference (bit-identical).
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a [B, H, T, C] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    B, H, T, C = x.shape
    check_quant_args(kind, bits, group, C, T)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be an int in [0, {MAX_RANK}], got {rank!r}")
    if isinstance(lr_block, bool) or not isinstance(lr_block, int) or lr_block < 16 or lr_block % 16:
        raise ValueError(f"lr_block must be a positive multiple of 16, got {lr_block!r}")
    xf = x.float()
    rows = _rows(xf, kind, group)  # [..., n]
    n = rows.shape[-1]
    each = outlier_count(outliers, n)
    if each:
        order = torch.argsort(rows, dim=-1, stable=True)
        idx = torch.cat([order[..., :each], order[..., n - each:]], -1)  # [..., 2 * each]
        is_out = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, idx, True)
        others = (rows.sum(-1, keepdim=True) - rows.gather(-1, idx).sum(-1, keepdim=True)) / (n - 2 * each)
        kept = _unrows(torch.where(is_out, others, rows), kind, xf.shape)
        out_mask = _unrows(is_out, kind, xf.shape)
    else:
        kept, out_mask = xf, None
    quant = quantize if use_kernel else quantize_reference
    qt = quant(kept, kind, bits, group, scale_dtype=scale_dtype)
    deq = dequantize(qt)

    lr_a = lr_b = lr_seg = None
    low = torch.zeros_like(xf)
    if rank:
        err = xf - deq
        if out_mask is not None:
            err = err.masked_fill(out_mask, 0.0)
        a, b = _power_iteration(err, rank, iters, seed)
        lr_a, lr_b = a.to(factor_dtype).contiguous(), b.to(factor_dtype)[:, :, None].contiguous()  # one segment
        lr_seg = torch.zeros(1, 1, -(-T // lr_block), dtype=torch.int32, device=x.device)
        low = lr_a.float() @ lr_b[:, :, 0].float().transpose(-1, -2)
    out_idx = out_val = None
    if each:
        stored = _rows(xf - low, kind, group).gather(-1, idx)  # [..., 2 * each]
        if kind == "keys":  # [B, H, T // group, C, n_out] -> [B, H, T // group, n_out, C]
            out_idx, out_val = idx.transpose(-1, -2), stored.transpose(-1, -2)
        else:
            out_idx, out_val = idx, stored
        out_idx = out_idx.to(torch.uint8).contiguous()
        out_val = out_val.float().contiguous()
    return qt, GearTerms(lr_a, lr_b, lr_seg, lr_block, out_idx, out_val)


def _segment_of_tokens(terms: GearTerms, B: int, H: int, t: int) -> Tensor:
    seg = terms.lr_seg.expand(B, H, terms.lr_seg.shape[-1]).long()
    return seg[..., torch.arange(t, device=seg.device) // terms.lr_block]  # [B, H, t]


def low_rank_term(terms: GearTerms, tokens: int) -> Tensor | None:
    """float32 ``A B_seg^T [B, H, tokens, C]`` (None without a low-rank term)."""
    if terms.lr_a is None:
        return None
    B, H = terms.lr_a.shape[:2]
    a = terms.lr_a[:, :, :tokens].float()  # [B, H, t, r]
    seg = _segment_of_tokens(terms, B, H, tokens)  # [B, H, t]
    b = terms.lr_b.float()  # [B, H, S, C, r]
    out = a.new_zeros(B, H, tokens, b.shape[-2])
    for s in range(b.shape[2]):  # a few segments: one matmul each
        ls = a @ b[:, :, s].transpose(-1, -2)
        out = torch.where((seg == s)[..., None], ls, out)
    return out


def gear_reconstruct(qt: Quantized, terms: GearTerms | None, tokens: int | None = None) -> Tensor:
    """float32 ``X^ [B, H, tokens, C]``: dequantized codes + low-rank term, outliers set (module docstring)."""
    t = qt.tokens if tokens is None else int(tokens)
    x = dequantize(qt, t)
    if terms is None:
        return x
    low = low_rank_term(terms, t)
    if low is not None:
        x = x + low
    if terms.out_idx is not None and t:
        low = torch.zeros_like(x) if low is None else low
        B, H, _, C = x.shape
        if qt.kind == "keys":
            g = qt.group
            idx = terms.out_idx[:, :, : t // g].long()  # [B, H, t // g, n_out, C]
            val = terms.out_val[:, :, : t // g].float()
            xg = x.reshape(B, H, t // g, g, C).clone()
            lg = low.reshape(B, H, t // g, g, C)
            xg.scatter_(3, idx, val + lg.gather(3, idx))
            x = xg.reshape(B, H, t, C)
        else:
            idx = terms.out_idx[:, :, :t].long()  # [B, H, t, n_out]
            val = terms.out_val[:, :, :t].float()
            x = x.clone().scatter_(3, idx, val + low.gather(3, idx))
    return x


def concat_compressed(parts: list[tuple[Quantized, GearTerms]], lr_block: int | None = None
                      ) -> tuple[Quantized, GearTerms]:
    """Join separately compressed consecutive blocks into one cache: codes, scales and per-token terms concatenated
    along tokens, each block's low-rank factors a segment (ranks padded to the largest with zero columns).  Every
    block but the last must hold a multiple of ``lr_block`` tokens (the parts' own lr_block by default)."""
    if not parts:
        raise ValueError("concat_compressed needs at least one part")
    q0, t0 = parts[0]
    lr_block = t0.lr_block if lr_block is None else lr_block
    for i, (q, _) in enumerate(parts[:-1]):
        if q.tokens % lr_block:
            raise ValueError(f"part {i} has {q.tokens} tokens, not a multiple of lr_block {lr_block}")
    cat = lambda ts, d: torch.cat(ts, d)  # noqa: E731
    tdim = -2
    qt = Quantized(cat([q.codes for q, _ in parts], tdim), cat([q.scale for q, _ in parts], tdim),
                   cat([q.offset for q, _ in parts], tdim), q0.bits, q0.group, q0.kind)
    has_lr = [t.lr_a is not None for _, t in parts]
    has_out = [t.out_idx is not None for _, t in parts]
    if len(set(has_lr)) > 1 or len(set(has_out)) > 1:
        raise ValueError("all parts must have the same GEAR terms (low-rank and/or outliers)")
    lr_a = lr_b = lr_seg = out_idx = out_val = None
    if has_lr[0]:
        r = max(t.rank for _, t in parts)
        pad = lambda m: torch.cat([m, m.new_zeros(*m.shape[:-1], r - m.shape[-1])], -1)  # noqa: E731
        lr_a = cat([pad(t.lr_a) for _, t in parts], 2)
        lr_b = cat([pad(t.lr_b) for _, t in parts], 2)
        seg = []
        for s, (q, _) in enumerate(parts):
            seg += [s] * -(-q.tokens // lr_block)
        lr_seg = torch.tensor(seg, dtype=torch.int32, device=qt.codes.device).view(1, 1, -1)
    if has_out[0]:
        n_out = {t.n_out for _, t in parts}
        if len(n_out) > 1:
            raise ValueError(f"all parts must keep the same number of outliers per row, got {sorted(n_out)}")
        out_idx = cat([t.out_idx for _, t in parts], 2)
        out_val = cat([t.out_val for _, t in parts], 2)
    return qt, GearTerms(lr_a, lr_b, lr_seg, lr_block, out_idx, out_val)
