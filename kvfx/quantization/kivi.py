"""KIVI (Liu et al., 2024): asymmetric min-max quantization to ``bits`` bits, keys per channel over groups of
``group`` consecutive tokens, values per token over groups of ``group`` channels; the most recent tokens stay at
full precision.

Schedule (:class:`~kvfx.quantization.base.BlockQuantizer`): keys leave the residual buffer in whole blocks of
``residual`` tokens (a multiple of ``group``: whole key groups), values one token at a time once more than
``residual`` wait. The arithmetic is :mod:`kvfx.kernels.quant_pack`'s, written straight into the store's rows.
"""

from __future__ import annotations

from torch import Tensor

from kvfx.kernels.quant_pack import quantize, quantize_reference
from kvfx.quantization.base import BlockQuantizer, use_quantize_kernel
from kvfx.quantization.storage import QuantizedStore


class KiviQuantizer(BlockQuantizer):
    @property
    def whole_blocks(self) -> bool:
        return self.kind == "keys"

    def new_store(self, like: Tensor) -> QuantizedStore:
        return QuantizedStore(self.kind, self.bits, self.group, self.chunk, like)

    def compress(self, block: Tensor, store: QuantizedStore, *, prompt: bool) -> None:
        """Quantize ``block [B, Hkv, n, D]`` into the store's next ``n`` rows (the same for prompt and decode)."""
        out = store.append_rows(block.shape[2])
        if use_quantize_kernel(block, self.kind, self.group):
            quantize(block, self.kind, self.bits, self.group, out=out)
            return
        packed = quantize_reference(block, self.kind, self.bits, self.group)
        out.codes.copy_(packed.codes)
        out.scale.copy_(packed.scale)
        out.offset.copy_(packed.offset)
