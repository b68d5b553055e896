"""A quantized KV cache of one attention layer: the streaming schedule, its storage and its decode attention.

Keys and values each have a :class:`BlockQuantizer` (one quantize method, one kind): it says when the oldest
full-precision tokens leave the residual buffer (:meth:`BlockQuantizer.flush_count`) and how a block of them is
stored (:meth:`BlockQuantizer.compress`, into a :class:`~kvfx.quantization.storage.QuantizedStore`). Two
schedules exist, both from the papers:

* whole blocks (KIVI keys, GEAR keys and values): at the prompt, all but the last ``T mod residual`` tokens are
  quantized; in decode a token waits in the buffer and the buffer is quantized as one block when it holds
  ``residual`` tokens. Keys are grouped along tokens, so a block is whole groups.
* token by token (KIVI values, quantized per token): at the prompt, all but the last ``residual`` tokens (none when
  ``T <= residual``); in decode the oldest token is quantized once the buffer holds more than ``residual``.

:class:`QuantizedLayerCache` drives a decode step as *append, attend, flush*: the new token is attended at full
precision from the buffer, and only then may a block leave it. So a step attending ``N`` tokens reads
``(N - 1) // residual * residual`` quantized keys (whole blocks), ``max(0, N - 1 - residual)`` quantized values
(token by token), the rest from the buffers. The prompt itself is attended at full precision by the caller
(``kvfx.ops``), before :meth:`QuantizedLayerCache.compress_prompt` stores it.

Decode attention: on CUDA the fused kernel :func:`kvfx.kernels.quant_decode_attention.quant_decode_attention`
(dequantizing in registers) where it supports the inputs, else its float32 torch reference with a one-time
warning; on the CPU always the reference. A mask that varies by head (ALiBi) is not a ``[B, Tk]`` row: such steps
dequantize the cache and run the eager formula in float32.

The pieces are separate so that a composite cache (eviction + quantization) can reuse the block quantizers and
the stores with its own schedule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from kvfx.eviction.layer_inputs import check_decode_batch
from kvfx.kernels.gear import gear_reconstruct
from kvfx.kernels.prefill_attention import attention_math
from kvfx.kernels.quant_decode_attention import quant_decode_attention, quant_decode_attention_reference, supports
from kvfx.kernels.quant_pack import KINDS, codes_per_word
from kvfx.notices import warn_once
from kvfx.quantization.storage import GROWTH_CHUNK, QuantizedStore, ResidualBuffer, round_up
from kvfx.state import KvfxCacheError


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def use_quantize_kernel(x: Tensor, kind: str, group: int) -> bool:
    """Whether the Triton quantizer packs ``x [B, H, T, C]`` (CUDA, power-of-two head dim and group, a key group
    that fits one program); elsewhere its bit-identical torch reference does."""
    c = x.shape[-1]
    fits = kind != "keys" or group * c <= 256 * 256
    return x.is_cuda and is_pow2(c) and is_pow2(group) and fits


class BlockQuantizer(ABC):
    """One quantize method (a spec config with ``bits``, ``group``, ``residual``) for one of keys / values.

    Stateless: the tokens live in the store it makes (:meth:`new_store`) and in the caller's residual buffer.
    """

    def __init__(self, config, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.config = config
        self.kind = kind
        self.bits = int(config.bits)
        self.group = int(config.group)
        self.residual = int(config.residual)

    # ---- the schedule ---------------------------------------------------------------------------

    @property
    @abstractmethod
    def whole_blocks(self) -> bool:
        """True: tokens leave the buffer ``residual`` at a time; False: one at a time past ``residual``."""

    def flush_count(self, pending: int) -> int:
        """How many of the oldest of ``pending`` full-precision tokens to quantize now (at the end of the prompt,
        or after a decode step has attended)."""
        if self.whole_blocks:
            return pending - pending % self.residual
        return max(0, pending - self.residual)

    @property
    def buffer_tokens(self) -> int:
        """Capacity of the residual buffer: whole blocks never hold more than ``residual`` tokens; token by token
        holds ``residual + 1`` during a step, and twice ``residual`` lets the oldest leave by moving an index."""
        return self.residual if self.whole_blocks else 2 * self.residual

    @property
    def chunk(self) -> int:
        """The store's growth step: a multiple of ``residual`` (hence of ``group``)."""
        return round_up(GROWTH_CHUNK, self.residual)

    # ---- checks and storage ---------------------------------------------------------------------

    def check(self, layer: int, head_dim: int) -> None:
        """Raise KvfxCacheError unless this method can quantize this kind at ``head_dim``."""
        per = codes_per_word(self.bits)
        if head_dim % per:
            self._reject(layer, head_dim, f"{self.bits}-bit codes are packed {per} to an int32 word, so head_dim "
                                          f"must be a multiple of {per}")
        if self.kind == "values" and head_dim % self.group:
            self._reject(layer, head_dim, f"values are quantized per token in groups of channels, so group "
                                          f"{self.group} must divide head_dim {head_dim}")
        if self.kind == "values" and self.group < per:
            self._reject(layer, head_dim, f"value group {self.group} is below {per}, the {self.bits}-bit codes of one "
                                          "int32 word (a word must not straddle two value groups)")

    def _reject(self, layer: int, head_dim: int, reason: str):
        raise KvfxCacheError(f"layer {layer}: quantize {self.config.describe()} cannot quantize the {self.kind} of "
                             f"this layer (head_dim {head_dim}, group {self.group}): {reason}")

    @abstractmethod
    def new_store(self, like: Tensor) -> QuantizedStore:
        """An empty store for tokens shaped like ``like [B, Hkv, *, D]``."""

    @abstractmethod
    def compress(self, block: Tensor, store: QuantizedStore, *, prompt: bool) -> None:
        """Quantize ``block [B, Hkv, n, D]`` (the oldest tokens not yet stored; keys: whole groups) and append it
        to ``store``. ``prompt``: the block is the prompt's (methods may compress it differently)."""


class QuantizedLayerCache:
    """The KV cache of one attention layer, keys and values each quantized by a :class:`BlockQuantizer`
    (module docstring): a :class:`QuantizedStore` and a :class:`ResidualBuffer` per kind.

    ``keep_last`` > 0 (a sliding-window layer): the cache does not slide; it serves the layer while no token has
    left transformers' window and raises KvfxCacheError at the first step that would need one dropped.
    """

    def __init__(self, layer: int, key_quantizer: BlockQuantizer, value_quantizer: BlockQuantizer,
                 keep_last: int = 0):
        if (key_quantizer.kind, value_quantizer.kind) != ("keys", "values"):
            raise ValueError("QuantizedLayerCache takes a key quantizer and a value quantizer, in that order")
        self.layer = layer
        self.keep_last = keep_last
        self.quantizers = {"keys": key_quantizer, "values": value_quantizer}
        self.stores: dict[str, QuantizedStore] = {}
        self.residuals: dict[str, ResidualBuffer] = {}
        self.seen = 0  # tokens written (padding included): the cache length transformers believes in

    # ---- sizes ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        """The cache length transformers reports for this layer (its sliding window, if any, applied)."""
        return min(self.seen, self.keep_last) if self.keep_last else self.seen

    @property
    def quantized_tokens(self) -> tuple[int, int]:
        """(keys, values) quantized so far."""
        return tuple(self.stores[kind].tokens if self.stores else 0 for kind in KINDS)

    @property
    def residual_tokens(self) -> tuple[int, int]:
        """(keys, values) waiting at full precision."""
        return tuple(len(self.residuals[kind]) if self.residuals else 0 for kind in KINDS)

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the stores (capacity included) and the residual buffers."""
        parts = list(self.stores.values()) + list(self.residuals.values())
        return sum(part.nbytes for part in parts)

    @property
    def used_bytes(self) -> int:
        """Bytes of the stored tokens: codes, scales, offsets, GEAR's terms, and the live residual tokens."""
        parts = list(self.stores.values()) + list(self.residuals.values())
        return sum(part.used_bytes for part in parts)

    # ---- prefill --------------------------------------------------------------------------------

    def compress_prompt(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, **_) -> None:
        """Store the prompt's keys and values ``[B, Hkv, T, D]`` (attended already, at full precision): the
        schedule's share quantized, the rest in the residual buffers. ``q`` and ``mask`` are unused."""
        if self.stores:
            raise KvfxCacheError(f"layer {self.layer}: the prompt was already written to this cache")
        for kind, x in zip(KINDS, (k, v)):
            self.quantizers[kind].check(self.layer, x.shape[-1])
        for kind, x in zip(KINDS, (k, v)):
            quantizer = self.quantizers[kind]
            store = self.stores[kind] = quantizer.new_store(x)
            count = quantizer.flush_count(x.shape[2])
            if count:
                quantizer.compress(_last_dim_contiguous(x[:, :, :count]), store, prompt=True)
            buffer = self.residuals[kind] = ResidualBuffer(x, quantizer.buffer_tokens)
            buffer.append(x[:, :, count:])
        self.seen = k.shape[2]

    # ---- decode ---------------------------------------------------------------------------------

    def decode(self, q: Tensor, k_new: Tensor, v_new: Tensor, mask: Tensor | None, *, scale: float,
               softcap: float, **_) -> Tensor:
        """One decode step: q ``[B, Hq, 1, D]``, k_new/v_new ``[B, Hkv, 1, D]`` -> ``[B, Hq, 1, Dv]``; mask
        ``[B|1, 1|Hq, 1, Tk]`` (bool or additive) or None. Append, attend, flush (module docstring)."""
        self.append_token(k_new, v_new)
        out = self.attend(q, mask, scale=scale, softcap=softcap)
        self.flush()
        return out

    def append_token(self, k_new: Tensor, v_new: Tensor) -> None:
        """Write the new token ``[B, Hkv, 1, D]`` to the residual buffers."""
        if not self.stores:
            raise KvfxCacheError(f"layer {self.layer}: decode before the prompt")
        store = self.stores["keys"]
        check_decode_batch(self.layer, k_new, store.batch, store.heads)
        if self.keep_last and self.seen > self.keep_last:
            raise KvfxCacheError(
                f"layer {self.layer}: this sliding-window layer keeps only its last {self.keep_last} tokens and the "
                f"sequence already has {self.seen}; quantized caches do not slide yet: give sliding-window layers "
                "quantize: {method: none} (per-layer overrides) or keep sequences within the window"
            )
        self.residuals["keys"].append(k_new)
        self.residuals["values"].append(v_new)
        self.seen += 1

    def attend(self, q: Tensor, mask: Tensor | None, *, scale: float, softcap: float) -> Tensor:
        """Attention of q ``[B, Hq, 1, D]`` over every token held (quantized, then residual): ``[B, Hq, 1, Dv]``."""
        inputs = self.decode_inputs()
        query = q[:, :, 0]  # [B, Hq, D]
        row = _mask_row(self.layer, mask, query.shape[0], inputs["kv_len"])
        if row is False:
            out = _dequantized_attention(query, mask, scale=scale, softcap=softcap, **inputs)
        else:
            out = quantized_decode_attention(query, mask=row, scale=scale, softcap=softcap, **inputs)
        return out.unsqueeze(2)

    def flush(self) -> None:
        """Quantize what the schedule says has waited long enough (after a step has attended)."""
        for kind in KINDS:
            quantizer, buffer = self.quantizers[kind], self.residuals[kind]
            count = quantizer.flush_count(len(buffer))
            if count:
                quantizer.compress(buffer.oldest(count), self.stores[kind], prompt=False)
                buffer.drop_oldest(count)

    def decode_inputs(self) -> dict:
        """The cache as :func:`~kvfx.kernels.quant_decode_attention.quant_decode_attention` takes it (keyword
        arguments after ``q``): the stores' whole capacity with the counts written, the residual views."""
        keys, values = self.stores["keys"], self.stores["values"]
        k_res, v_res = self.residuals["keys"], self.residuals["values"]
        kv_len = keys.tokens + len(k_res)
        if values.tokens + len(v_res) != kv_len:
            raise RuntimeError(f"layer {self.layer}: keys hold {kv_len} tokens, values {values.tokens + len(v_res)}")
        return dict(keys=keys.packed, values=values.packed, k_res=k_res.tokens(), v_res=v_res.tokens(),
                    k_quantized=keys.tokens, v_quantized=values.tokens, kv_len=kv_len,
                    k_gear=keys.gear_terms(), v_gear=values.gear_terms())


def quantized_decode_attention(q: Tensor, *, mask: Tensor | None, scale: float, softcap: float, **inputs) -> Tensor:
    """q ``[B, Hq, D]`` over a quantized cache (``inputs`` as :meth:`QuantizedLayerCache.decode_inputs` gives them;
    mask ``[B, kv_len]`` or None) -> ``[B, Hq, Dv]``: the fused kernel on CUDA where supported, else the float32
    reference (with a one-time warning on CUDA)."""
    if q.is_cuda:
        reason = supports(q, inputs["keys"], inputs["values"], inputs["k_res"], inputs["v_res"])
        if reason is None:
            return quant_decode_attention(q, mask=mask, scale=scale, softcap=softcap, **inputs)
        warn_once(f"kvfx: quantized decode attention runs the torch reference ({reason})")
    return quant_decode_attention_reference(q, mask=mask, scale=scale, softcap=softcap, **inputs)


def _dequantized_attention(q: Tensor, mask: Tensor, *, scale: float, softcap: float, keys, values, k_res, v_res,
                           k_quantized: int, v_quantized: int, kv_len: int, k_gear, v_gear) -> Tensor:
    """The eager formula in float32 over the dequantized cache, for masks that vary by head: ``[B, Hq, Dv]``."""
    k, v = reconstruct(dict(keys=keys, values=values, k_res=k_res, v_res=v_res, k_quantized=k_quantized,
                            v_quantized=v_quantized, kv_len=kv_len, k_gear=k_gear, v_gear=v_gear))
    if mask.dtype.is_floating_point:
        mask = mask.float()
    out = attention_math(q.float().unsqueeze(2), k, v, mask=mask[:, :, -1:, :], scale=scale, softcap=softcap)
    return out[:, :, 0].to(q.dtype)


def reconstruct(inputs: dict) -> tuple[Tensor, Tensor]:
    """float32 keys and values ``[B, Hkv, kv_len, D]`` of a quantized cache (``inputs`` as
    :meth:`QuantizedLayerCache.decode_inputs` gives them): the dequantized tokens, then the residual ones."""
    n = inputs["kv_len"]
    k = torch.cat([gear_reconstruct(inputs["keys"], inputs["k_gear"], inputs["k_quantized"]),
                   inputs["k_res"][:, :, : n - inputs["k_quantized"]].float()], dim=2)
    v = torch.cat([gear_reconstruct(inputs["values"], inputs["v_gear"], inputs["v_quantized"]),
                   inputs["v_res"][:, :, : n - inputs["v_quantized"]].float()], dim=2)
    return k, v


def _mask_row(layer: int, mask: Tensor | None, batch: int, kv_len: int):
    """The decode mask ``[B|1, 1|Hq, 1, Tk]`` as the kernel takes it, ``[B, kv_len]``; None for no mask; False if it
    varies by head."""
    if mask is None:
        return None
    if mask.shape[-1] != kv_len:
        raise KvfxCacheError(f"layer {layer}: the attention mask covers {mask.shape[-1]} keys but the quantized "
                             f"cache holds {kv_len}")
    if mask.shape[1] != 1:
        return False
    return mask[:, 0, -1, :].expand(batch, kv_len)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
