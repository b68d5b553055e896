"""KV-cache quantization: KIVI and GEAR (one method per file) over a streaming quantized layer cache.

:func:`make_quantizer` turns a spec's ``quantize`` config into the :class:`BlockQuantizer` of keys or values;
:class:`QuantizedLayerCache` (kvfx.quantization.base) drives both through the prompt and the decode steps.
"""

from kvfx.quantization.base import BlockQuantizer, QuantizedLayerCache
from kvfx.quantization.gear import GearQuantizer
from kvfx.quantization.kivi import KiviQuantizer

QUANTIZERS: dict[str, type[BlockQuantizer]] = {"kivi": KiviQuantizer, "gear": GearQuantizer}


def make_quantizer(config, kind: str) -> BlockQuantizer:
    """The block quantizer of ``kind`` ("keys" | "values") for a spec ``quantize`` config (kivi or gear)."""
    quantizer = QUANTIZERS.get(config.method)
    if quantizer is None:
        raise ValueError(f"quantize method {config.method!r} has no block quantizer (known: "
                         f"{', '.join(sorted(QUANTIZERS))})")
    return quantizer(config, kind)


def make_quantized_cache(layer: int, config, keep_last: int = 0) -> QuantizedLayerCache:
    """A layer's cache with keys and values quantized by ``config``."""
    return QuantizedLayerCache(layer, make_quantizer(config, "keys"), make_quantizer(config, "values"), keep_last)


__all__ = ["BlockQuantizer", "QuantizedLayerCache", "KiviQuantizer", "GearQuantizer", "QUANTIZERS",
           "make_quantizer", "make_quantized_cache"]
