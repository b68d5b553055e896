"""What a quantized layer may be: one quantize config for all its KV heads, and no razor on it. One check, shared by
the compile step (kvfx.plans, as a SpecError) and the cache factory (kvfx.ops, at the first prefill)."""

from __future__ import annotations

from kvfx.state import KvfxCacheError


def layer_quantize_config(layer: int, policies):
    """The quantize config of a layer whose KV heads' ``policies`` quantize, or None where none does. Raises
    :class:`KvfxCacheError` for several configs in one layer (a quantized layer's heads share one store) and for
    razor with quantization (not supported yet)."""
    if all(policy.quantize.method == "none" for policy in policies):
        return None
    heads_by_config: dict[str, list[int]] = {}
    for head, policy in enumerate(policies):
        heads_by_config.setdefault(policy.quantize.describe(), []).append(head)
    if len(heads_by_config) > 1:
        found = "; ".join(f"{config} on KV heads {heads}" for config, heads in heads_by_config.items())
        raise KvfxCacheError(f"layer {layer}: a quantized layer takes one quantize config for all its KV heads, got "
                             f"{found}; quantize whole layers (per-layer overrides)")
    config = policies[0].quantize
    if any(policy.evict.method == "razor" for policy in policies):
        raise KvfxCacheError(f"layer {layer}: razor combined with quantization ({config.describe()}) is not "
                             "supported yet; use razor or quantization on this layer, not both (per-layer overrides)")
    return config


__all__ = ["layer_quantize_config"]
