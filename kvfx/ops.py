"""kvfx custom ops: what the rewritten graphs call in place of each attention and its cache update.

Ops are ``torch.library.custom_op`` with fake implementations, so dynamo, AOT autograd and inductor can trace them
on any device. Their CPU path is the torch reference; on CUDA the decode step runs the Triton kernel.

- ``kvfx::begin_sequence(like, plan_id)``: starts a sequence batch (prefill from an empty cache) and returns its
  handle, whose zero-storage views stand in for the cache tensors transformers keeps.
- ``kvfx::attention(q, k_new, v_new, handle, mask, ...)``: appends the new keys and values to kvfx's storage for
  that layer and attends over it, exactly like the ``cat`` + attention it replaces.
- ``kvfx::chunked_mlp(x, ...)`` (kvfx.chunked_mlp): a long prompt's MLP a block of rows at a time.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from kvfx.chunked_mlp import chunked_mlp  # registers kvfx::chunked_mlp, which kvfx.passes.chunk_mlp inserts
from kvfx.eviction import make_policy
from kvfx.eviction.ragged_cache import RaggedLayerCache
from kvfx.eviction.razor import retrieval_heads
from kvfx.eviction.slot_cache import EvictingLayerCache
from kvfx.kernels.decode_attention import decode_attention, decode_attention_reference, supports
from kvfx.kernels.prefill_attention import attention_math, prefill_attention
from kvfx.mask_factors import MaskFactors
from kvfx.notices import warn_once
from kvfx.plans import plan
from kvfx.quantization import QuantizedLayerCache, make_quantized_cache
from kvfx.quantization.evicting import QuantizedEvictingLayerCache
from kvfx.quantization.layer_rules import layer_quantize_config
from kvfx.state import REGISTRY, KvfxCacheError, LayerCache, SequenceState


@torch.library.custom_op("kvfx::begin_sequence", mutates_args=())
def begin_sequence(like: Tensor, plan_id: int) -> Tensor:
    return REGISTRY.begin(like, plan_id)


@begin_sequence.register_fake
def _begin_sequence_fake(like: Tensor, plan_id: int) -> Tensor:
    return like.new_empty(1, 1, 1, 1)


def attention_impl(
    q: Tensor,  # [B, Hq, Tq, D]
    k_new: Tensor,  # [B, Hkv, Tn, D]
    v_new: Tensor,  # [B, Hkv, Tn, Dv]
    handle: Tensor,  # the sequence handle (prefill) or the past-key tensor transformers passed back (decode)
    mask: Optional[Tensor],  # [B|1, 1|Hq, Tq, Tk], bool (True = attend) or additive float, or None
    layer: int,
    scale: float,
    softcap: float,
    is_causal: bool,
    keep_last: int,  # > 0: a sliding-window layer that keeps only its last keep_last tokens
    continuing: bool,  # the graph received a past cache (decode), rather than starting from an empty one
    eager_math: bool,  # the model used eager attention: reproduce its arithmetic on the reference path
    rope_inv_freq: Optional[Tensor],  # [D/2] the keys' RoPE frequencies, where the plan re-rotates kept keys
    mask_terms: List[Tensor],  # a prompt's bool mask as the AND of these factors (kvfx.mask_factors), or []
    mask_kinds: List[int],  # the factors' kinds: indices into kvfx.mask_factors.KINDS
) -> Tensor:  # [B, Hq, Tq, Dv]
    state = REGISTRY.lookup(handle)
    cache = _layer_cache(state, layer, keep_last)
    factors = MaskFactors.parse(mask_terms, mask_kinds)
    if factors is not None:
        if mask is not None:
            raise KvfxCacheError(f"layer {layer}: kvfx::attention got both a mask and mask factors")
        mask, is_causal = _from_factors(state, factors, q, k_new, continuing, is_causal)
    if mask is not None:
        mask = _as_4d(mask)
    past = handle.shape[-2] if continuing else 0
    if past != len(cache):
        raise KvfxCacheError(
            f"layer {layer}: transformers' cache holds {past} tokens but kvfx holds {len(cache)}: the cache was "
            "cropped or edited outside kvfx (DynamicCache.crop, assisted or contrastive decoding), "
            "which kvfx cannot follow"
        )
    if isinstance(cache, (EvictingLayerCache, RaggedLayerCache, QuantizedLayerCache)):
        return token_major(_attend_compressing(cache, q, k_new, v_new, mask, scale, softcap, is_causal, continuing,
                                               eager_math, rope_inv_freq))
    cache.append(k_new, v_new)
    keys, values = cache.keys(), cache.values()  # [B, Hkv, T, D] views of kvfx's storage
    if mask is not None and mask.shape[-1] != keys.shape[-2]:
        raise KvfxCacheError(
            f"layer {layer}: the attention mask covers {mask.shape[-1]} keys but the cache holds {keys.shape[-2]}"
        )
    out = _attend(q, keys, values, mask, scale, softcap, is_causal, eager_math)
    cache.trim()
    return token_major(out)


# The op compiled graphs call. attention_impl itself is what it runs: kvfx.graph_replay calls it directly from the
# host stages of a split decode graph, where the dispatcher's custom-op layers would only add host time.
attention = torch.library.custom_op("kvfx::attention", mutates_args=())(attention_impl)


def token_major(out: Tensor) -> Tensor:
    """``out`` [B, Hq, Tq, Dv] laid out as [B, Tq, Hq, Dv] in memory, the layout kvfx::attention promises the
    compiler. SDPA's output takes q's layout (seen on an H100: cuDNN's flash kernel), and inductor hands the op q
    in the projections' token-major layout, so a prompt's output needs no copy here; transformers then turns it
    into exactly this layout (``attn_output.transpose(1, 2).contiguous()``), which copies nothing either. At B=8,
    T=32768, Hq=32, d=64 a copy is 1 GiB more at the prompt's peak. A decode step's output (Tq = 1) is both layouts
    at once; the CPU's math path pays one copy."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@attention.register_fake
def _attention_fake(q, k_new, v_new, handle, mask, layer, scale, softcap, is_causal, keep_last, continuing,
                    eager_math, rope_inv_freq, mask_terms, mask_kinds):
    b, h, t, _ = q.shape
    return q.new_empty(b, t, h, v_new.shape[-1]).transpose(1, 2)  # token_major


def _mark_inference_only(ctx, inputs, output):
    ctx.mark_non_differentiable(output)


def _no_backward(ctx, grad):
    raise RuntimeError("kvfx's ops have no backward: kvfx serves inference")


# The cache state is not differentiable: outputs are marked so, and no backward is ever traced through kvfx (a graph
# compiled with gradients enabled gets the backend's warning).
attention.register_autograd(_no_backward, setup_context=_mark_inference_only)
begin_sequence.register_autograd(_no_backward, setup_context=_mark_inference_only)
chunked_mlp.register_autograd(_no_backward, setup_context=_mark_inference_only)


def _from_factors(state: SequenceState, factors: MaskFactors, q: Tensor, k_new: Tensor, continuing: bool,
                  is_causal: bool) -> tuple[Tensor | None, bool]:
    """``(mask, is_causal)`` for a mask given as factors: a prompt's plain causal mask (checked once per sequence
    and set of factors) becomes ``(None, True)``, so that prefill runs SDPA's causal kernels with no mask tensor;
    any other mask (padding, a sliding window) is built, ``[B, 1, Tq, Tk]``."""
    batch, queries = q.shape[0], q.shape[2]
    if not continuing and not is_causal and queries == k_new.shape[2]:
        key = factors.key()
        causal = state.causal_masks.get(key)
        if causal is None:
            causal = state.causal_masks[key] = factors.is_plain_causal(batch, queries)
        if causal:
            return None, True
    return factors.materialize(batch, queries), is_causal


def _layer_cache(state: SequenceState, layer: int, keep_last: int):
    """The layer's cache, made on first use: a full cache, a quantized one if its KV heads quantize, or an evicting
    one if any KV head's policy evicts."""
    cache = state.layers.get(layer)
    if cache is None:
        policies = plan(state.plan_id).layer_policies(layer)
        evicts = [policy.evict for policy in policies]
        if any(policy.quantize.method != "none" for policy in policies):
            cache = quantized_layer_cache(layer, policies, keep_last)
        elif any(e.method == "razor" for e in evicts):
            cache = _razor_cache(layer, evicts, keep_last)
        elif any(policies := [make_policy(e) for e in evicts]):
            cache = EvictingLayerCache(layer, policies, keep_last)
        else:
            cache = LayerCache(keep_last)
        state.layers[layer] = cache
    return cache


def _razor_cache(layer: int, evicts, keep_last: int) -> RaggedLayerCache:
    """RazorAttention's head-wise cache: retrieval heads (from the profile) and ``method: none`` heads keep
    everything, the other heads sinks + window + a compensation token."""
    razor = {e.describe(): e for e in evicts if e.method == "razor"}
    others = sorted({e.method for e in evicts} - {"razor", "none"})
    if others or len(razor) > 1:
        raise KvfxCacheError(f"layer {layer}: razor's KV heads share one layout, so a layer takes one razor config "
                             f"and no other eviction method (got {', '.join(sorted(razor))}"
                             f"{', ' + ', '.join(others) if others else ''}); use per-layer overrides")
    config = next(iter(razor.values()))
    chosen = retrieval_heads(config)
    keep_all = [e.method == "none" or (layer, head) in chosen for head, e in enumerate(evicts)]
    return RaggedLayerCache(layer, keep_all, config, keep_last)


def quantized_layer_cache(layer: int, policies, keep_last: int) -> QuantizedLayerCache | QuantizedEvictingLayerCache:
    """A layer whose KV heads quantize: one quantize config for all of them; with eviction on some heads, the
    evicting cache over quantized slots."""
    config = layer_quantize_config(layer, policies)
    evicting = any(policy.evict.method != "none" for policy in policies)
    quantized = make_quantized_cache(layer, config, keep_last if not evicting else 0)
    if not evicting:
        return quantized
    return QuantizedEvictingLayerCache(layer, [make_policy(p.evict) for p in policies], quantized, keep_last)


def _attend_compressing(cache: EvictingLayerCache | RaggedLayerCache | QuantizedLayerCache, q, k_new, v_new, mask,
                        scale, softcap, is_causal, continuing, eager_math, rope_inv_freq):
    """A compressing cache's step: the prompt is attended in full then compressed; a decode step is the cache's."""
    if not continuing:  # the prompt: ordinary attention over all of it, then the cache keeps its compressed form
        out = _attend(q, k_new, v_new, mask, scale, softcap, is_causal, eager_math)
        cache.compress_prompt(q, k_new, v_new, mask, scale=scale, softcap=softcap, is_causal=is_causal)
        return out
    if q.shape[2] != 1:
        raise KvfxCacheError(
            f"layer {cache.layer}: {q.shape[2]} new tokens in one step after the prompt; compressed caches take one "
            "token per decode step (chunked prefill, assisted and speculative decoding are not supported)"
        )
    return cache.decode(q, k_new, v_new, mask, scale=scale, softcap=softcap, inv_freq=rope_inv_freq)


def _attend(q, keys, values, mask, scale, softcap, is_causal, eager_math):
    decode_mask = _per_row_mask(mask, q)
    is_decode = q.shape[2] == 1 and not (is_causal and keys.shape[2] > 1) and decode_mask is not False
    if is_decode and q.is_cuda and q.dtype == keys.dtype:
        reason = supports(q[:, :, 0], keys)
        if reason is None:
            out = decode_attention(q[:, :, 0], keys, values, keys.shape[2], mask=decode_mask, scale=scale,
                                   softcap=softcap)
            return out.unsqueeze(2)
        warn_once(f"kvfx: decode attention runs the torch reference ({reason})")
        return decode_attention_reference(q[:, :, 0], keys, values, keys.shape[2], mask=decode_mask, scale=scale,
                                          softcap=softcap).unsqueeze(2)
    if eager_math:
        return attention_math(q, keys, values, mask=mask, scale=scale, softcap=softcap, is_causal=is_causal)
    return prefill_attention(q, keys, values, mask=mask, scale=scale, softcap=softcap, is_causal=is_causal)


def _as_4d(mask: Tensor) -> Tensor:
    """A mask or bias broadcastable to [B, H, Tq, Tk], as 4 dims; float masks clamped so that stacked large
    negative fills (a padding mask plus a causal mask) stay finite, as in eager attention, instead of -inf."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype.is_floating_point:
        mask = mask.clamp_min(torch.finfo(mask.dtype).min)
    return mask


def _per_row_mask(mask: Tensor | None, q: Tensor):
    """A decode mask as the kernel takes it, ``[B, Tk]``; None for no mask; False if it varies by head."""
    if mask is None:
        return None
    if mask.shape[1] != 1:
        return False
    return mask[:, 0, -1, :].expand(q.shape[0], mask.shape[-1])
