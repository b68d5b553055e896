"""Storage of a quantized layer cache: the full-precision residual buffer and the growing packed store.

* :class:`ResidualBuffer`: the most recent tokens of keys or values at full precision, oldest first, in a
  preallocated ``[B, Hkv, capacity, D]`` tensor whose live tokens are ``start:end``. Tokens leave from the front
  by moving ``start``; an append that would run past the end first moves the live tokens to the front (a copy
  only when the buffer is longer than the most it ever holds: once every ``capacity - max live`` tokens).
* :class:`QuantizedStore`: the quantized tokens of keys or values, packed as :mod:`kvfx.kernels.quant_pack` lays
  them out, preallocated for ``capacity`` tokens of which the first ``tokens`` are written::

      packed.codes   [B, Hkv, capacity, D // per]  int32
      packed.scale   keys [B, Hkv, capacity // group, D]     values [B, Hkv, capacity, D // group]   float16
      packed.offset  like scale

  Capacity grows in whole chunks (a multiple of the flush block, so that key groups and GEAR's low-rank blocks
  never straddle a chunk), by at least 1/8, copying the written part once per growth. Readers get the whole
  capacity and the count of written tokens (the decode kernels take both).

Nothing here decides *when* tokens are quantized: that is the block quantizers' schedule
(:mod:`kvfx.quantization.base`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.kernels.gear import GearTerms
from kvfx.kernels.quant_pack import Quantized, empty_quantized

GROWTH_CHUNK = 64  # tokens: the smallest growth step (rounded up to a multiple of the flush block)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tensor_bytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class ResidualBuffer:
    """Full-precision tokens waiting to be quantized, oldest first (module docstring)."""

    def __init__(self, like: Tensor, capacity: int):
        b, h, _, d = like.shape
        self.data = like.new_empty(b, h, capacity, d)  # [B, Hkv, capacity, D]
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def capacity(self) -> int:
        return self.data.shape[2]

    def tokens(self) -> Tensor:
        """The live tokens, oldest first: ``[B, Hkv, len, D]``, a view."""
        return self.data[:, :, self.start : self.end]

    def oldest(self, count: int) -> Tensor:
        """The ``count`` oldest live tokens ``[B, Hkv, count, D]``, a view."""
        return self.data[:, :, self.start : self.start + count]

    def append(self, x: Tensor) -> None:
        """Append ``x [B, Hkv, n, D]`` after the live tokens."""
        n = x.shape[2]
        live = len(self)
        if live + n > self.capacity:
            raise RuntimeError(f"residual buffer overflow: {live} + {n} tokens in a buffer of {self.capacity}")
        if self.end + n > self.capacity:  # move the live tokens to the front (clone where the ranges overlap)
            source = self.tokens()
            self.data[:, :, :live] = source.clone() if self.start < live else source
            self.start, self.end = 0, live
        self.data[:, :, self.end : self.end + n] = x
        self.end += n

    def drop_oldest(self, count: int) -> None:
        if not 0 <= count <= len(self):
            raise RuntimeError(f"cannot drop {count} of {len(self)} residual tokens")
        self.start += count
        if self.start == self.end:
            self.start = self.end = 0

    @property
    def nbytes(self) -> int:
        """Bytes allocated."""
        return tensor_bytes(self.data)

    @property
    def used_bytes(self) -> int:
        """Bytes of the live tokens."""
        b, h, _, d = self.data.shape
        return b * h * len(self) * d * self.data.element_size()


class QuantizedStore:
    """The packed quantized tokens of one of keys / values of a layer (module docstring).

    ``kind`` "keys" | "values"; ``chunk`` the growth step in tokens (a multiple of the key group and of the flush
    block); ``like`` a ``[B, Hkv, *, D]`` tensor giving the batch, heads, head dim and device.
    """

    def __init__(self, kind: str, bits: int, group: int, chunk: int, like: Tensor,
                 scale_dtype: torch.dtype = torch.float16):
        self.kind = kind
        self.bits = bits
        self.group = group
        self.chunk = chunk
        self.scale_dtype = scale_dtype
        self.batch, self.heads, _, self.head_dim = like.shape
        self.device = like.device
        self.tokens = 0  # written tokens: packed rows 0 .. tokens - 1
        self.packed: Quantized | None = None
        self._resize(0)

    @property
    def capacity(self) -> int:
        return self.packed.tokens

    def param_rows(self, tokens: int) -> int:
        """Rows of scale/offset that ``tokens`` tokens fill (keys: one per group of tokens; values: per token)."""
        return tokens // self.group if self.kind == "keys" else tokens

    def append_rows(self, count: int) -> Quantized:
        """Room for ``count`` more tokens (growing if needed): views of their rows, to be written by the caller."""
        self.reserve(count)
        start = self.tokens
        self.tokens += count
        return self.rows(start, count)

    def rows(self, start: int, count: int) -> Quantized:
        """Views of tokens ``start .. start + count - 1`` (keys: ``start`` and ``count`` multiples of group)."""
        p = self.packed
        first, last = self.param_rows(start), self.param_rows(start + count)
        return Quantized(p.codes[:, :, start : start + count], p.scale[:, :, first:last], p.offset[:, :, first:last],
                         p.bits, p.group, p.kind)

    def reserve(self, extra: int) -> None:
        """Make sure ``extra`` more tokens fit."""
        needed = self.tokens + extra
        if needed > self.capacity:
            self._resize(round_up(max(needed, self.capacity + self.capacity // 8), self.chunk))

    def gear_terms(self) -> GearTerms | None:
        """GEAR's terms for the decode kernel (None: plain KIVI codes)."""
        return None

    def _resize(self, capacity: int) -> None:
        """Reallocate for ``capacity`` tokens, keeping the written ones."""
        packed = empty_quantized(self.batch, self.heads, capacity, self.head_dim, self.kind, self.bits, self.group,
                                 scale_dtype=self.scale_dtype, device=self.device)
        if self.packed is not None and self.tokens:
            rows = self.param_rows(self.tokens)
            packed.codes[:, :, : self.tokens] = self.packed.codes[:, :, : self.tokens]
            packed.scale[:, :, :rows] = self.packed.scale[:, :, :rows]
            packed.offset[:, :, :rows] = self.packed.offset[:, :, :rows]
        self.packed = packed

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity included)."""
        return tensor_bytes(self.packed.codes, self.packed.scale, self.packed.offset)

    @property
    def used_bytes(self) -> int:
        """Bytes of the written tokens' codes, scales and offsets."""
        return self.packed.nbytes(self.tokens)
