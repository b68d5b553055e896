"""GEAR (Kang et al., 2024): KIVI-style quantization corrected by a low-rank approximation of the quantization
error and exact sparse outliers (:mod:`kvfx.kernels.gear` holds the arithmetic and the layout).

Schedule: keys and values both leave the residual buffer in whole blocks of ``residual`` tokens. The prompt's
share (all but the last ``T mod residual`` tokens) is compressed once at the end of prefill with rank
``prefill_rank``; each later block is compressed once with rank ``rank`` and appended as a new low-rank segment
(``concat_compressed``'s semantics with ``lr_block = residual``): nothing stored is ever recompressed.

Store (:class:`GearStore`, beside the packed codes of :class:`~kvfx.quantization.storage.QuantizedStore`, all
preallocated with the same token capacity and grown together)::

    lr_a     [B, Hkv, capacity, r]                   per quantized token; r = max(rank, prefill_rank), a segment
                                                     of lower rank zero-padded
    lr_b     [B, Hkv, capacity // residual, D, r]    per segment (the first ``segments`` written)
    lr_seg   [1, 1, capacity // residual] int32      the segment of each block of ``residual`` tokens
    out_idx  keys [B, Hkv, capacity // group, n_out, D] / values [B, Hkv, capacity, n_out]  uint8 (if n_out > 0)
    out_val  like out_idx, float32
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.kernels.gear import MAX_RANK, GearTerms, gear_compress_reference, outlier_count
from kvfx.kernels.quant_pack import Quantized
from kvfx.quantization.base import BlockQuantizer, use_quantize_kernel
from kvfx.quantization.storage import QuantizedStore, tensor_bytes

FACTOR_DTYPE = torch.float16  # the low-rank factors' storage (kvfx.kernels.gear's default)
_LR_BLOCK_MULTIPLE = 16  # the decode kernel reads the low-rank segment map in blocks of a multiple of 16 tokens
_MAX_OUTLIER_ROW = 256  # outlier positions are stored as uint8


class GearStore(QuantizedStore):
    """Packed codes plus GEAR's low-rank and outlier terms (module docstring)."""

    def __init__(self, kind: str, bits: int, group: int, chunk: int, like: Tensor, *, rank: int, block: int,
                 outliers_per_row: int):
        self.rank = rank
        self.block = block
        self.outliers_per_row = outliers_per_row
        self.segments = 0
        self.lr_a = self.lr_b = self.lr_seg = self.out_idx = self.out_val = None
        super().__init__(kind, bits, group, chunk, like)

    def append(self, packed: Quantized, terms: GearTerms) -> None:
        """Append one compressed block (``gear_compress_reference``'s output: one segment, whole lr_blocks)."""
        n = packed.tokens
        start = self.tokens
        out = self.append_rows(n)
        out.codes.copy_(packed.codes)
        out.scale.copy_(packed.scale)
        out.offset.copy_(packed.offset)
        r = terms.rank
        self.lr_a[:, :, start : start + n, :r] = terms.lr_a
        self.lr_b[:, :, self.segments, :, :r] = terms.lr_b[:, :, 0]
        self.lr_seg[..., start // self.block : (start + n) // self.block] = self.segments
        self.segments += 1
        if self.outliers_per_row:
            first, last = self.param_rows(start), self.param_rows(start + n)
            self.out_idx[:, :, first:last] = terms.out_idx
            self.out_val[:, :, first:last] = terms.out_val

    def gear_terms(self) -> GearTerms | None:
        if not self.tokens:
            return None
        return GearTerms(self.lr_a, self.lr_b[:, :, : self.segments], self.lr_seg, self.block, self.out_idx,
                         self.out_val)

    def _resize(self, capacity: int) -> None:
        super()._resize(capacity)
        b, h, d, r = self.batch, self.heads, self.head_dim, self.rank
        blocks = capacity // self.block
        self.lr_a = self._grown(self.lr_a, (b, h, capacity, r), self.tokens, FACTOR_DTYPE)
        self.lr_b = self._grown(self.lr_b, (b, h, blocks, d, r), self.segments, FACTOR_DTYPE)
        self.lr_seg = self._grown(self.lr_seg, (1, 1, blocks), self.tokens // self.block, torch.int32)
        if self.outliers_per_row:
            rows, n = self.param_rows(capacity), self.outliers_per_row
            shape = (b, h, rows, n, d) if self.kind == "keys" else (b, h, rows, n)
            kept = self.param_rows(self.tokens)
            self.out_idx = self._grown(self.out_idx, shape, kept, torch.uint8)
            self.out_val = self._grown(self.out_val, shape, kept, torch.float32)

    def _grown(self, old: Tensor | None, shape: tuple, keep: int, dtype: torch.dtype) -> Tensor:
        """A zeroed ``shape`` tensor holding ``old``'s first ``keep`` entries along dim 2."""
        new = torch.zeros(shape, dtype=dtype, device=self.device)
        if old is not None and keep:
            new[:, :, :keep] = old[:, :, :keep]
        return new

    @property
    def nbytes(self) -> int:
        return super().nbytes + tensor_bytes(self.lr_a, self.lr_b, self.lr_seg, self.out_idx, self.out_val)

    @property
    def used_bytes(self) -> int:
        """Codes, scales and offsets of the written tokens, their lr_a rows and outliers, the written segments'
        lr_b and the segment map of their blocks."""
        t = self.tokens
        b, h, d, r = self.batch, self.heads, self.head_dim, self.rank
        total = super().used_bytes
        total += b * h * t * r * self.lr_a.element_size()
        total += b * h * self.segments * d * r * self.lr_b.element_size()
        total += (t // self.block) * self.lr_seg.element_size()
        if self.outliers_per_row:
            per_row = self.outliers_per_row * (d if self.kind == "keys" else 1)
            entry = self.out_idx.element_size() + self.out_val.element_size()
            total += b * h * self.param_rows(t) * per_row * entry
        return total


class GearQuantizer(BlockQuantizer):
    def __init__(self, config, kind: str):
        super().__init__(config, kind)
        self.rank = int(config.rank)
        self.prefill_rank = int(config.prefill_rank)
        self.outliers = float(config.outliers)

    @property
    def whole_blocks(self) -> bool:
        return True

    def row_length(self, head_dim: int) -> int:
        """Entries of one outlier row: keys one channel of a token group, values one token's channels."""
        return self.group if self.kind == "keys" else head_dim

    def check(self, layer: int, head_dim: int) -> None:
        super().check(layer, head_dim)
        if self.residual % _LR_BLOCK_MULTIPLE:
            self._reject(layer, head_dim, f"residual {self.residual} is GEAR's low-rank block and must be a multiple "
                                          f"of {_LR_BLOCK_MULTIPLE}")
        for name, rank in (("rank", self.rank), ("prefill_rank", self.prefill_rank)):
            if rank > MAX_RANK:
                self._reject(layer, head_dim, f"{name} {rank} is above {MAX_RANK}, the most the decode kernel reads")
        row = self.row_length(head_dim)
        if outlier_count(self.outliers, row) and row > _MAX_OUTLIER_ROW:
            self._reject(layer, head_dim, f"outlier rows of {row} entries exceed {_MAX_OUTLIER_ROW} (uint8 positions)")

    def new_store(self, like: Tensor) -> GearStore:
        return GearStore(self.kind, self.bits, self.group, self.chunk, like, rank=max(self.rank, self.prefill_rank),
                         block=self.residual, outliers_per_row=2 * outlier_count(self.outliers,
                                                                                  self.row_length(like.shape[-1])))

    def compress(self, block: Tensor, store: GearStore, *, prompt: bool) -> None:
        """Compress ``block [B, Hkv, n, D]`` (n a multiple of ``residual``) as one segment and append it."""
        packed, terms = gear_compress_reference(
            block, self.kind, self.bits, self.group, self.prefill_rank if prompt else self.rank, self.outliers,
            lr_block=self.residual, use_kernel=use_quantize_kernel(block, self.kind, self.group))
        store.append(packed, terms)
