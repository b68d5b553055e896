"""Paper-faithful references of KIVI and GEAR: the full-precision cache is kept (as transformers' ``DynamicCache``
keeps it) and, at every decode step, the part the schedule has quantized is fake-quantized from scratch with the
kernels' torch references, then plain float32 attention runs. Written independently of the streaming cache
(:mod:`kvfx.quantization.base`): no residual buffers, no stores, the schedule as closed forms of the step's length.

At a decode step attending ``N`` tokens (the new one included; ``R`` = residual, ``T`` = the prompt's length):

* KIVI keys: the first ``(N - 1) // R * R`` are quantized (per channel, groups of ``group`` tokens from position
  0); values: the first ``max(0, N - 1 - R)`` (per token).
* GEAR, keys and values: the first ``(N - 1) // R * R``, compressed block by block: the prompt's
  ``T // R * R`` tokens as one block with ``prefill_rank``, then each later block of ``R`` tokens with ``rank``.

The prompt itself is attended at full precision. :func:`register_faithful_quantized_attention` installs a model's
layers as a transformers attention implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.kernels.gear import gear_compress_reference, gear_reconstruct
from kvfx.kernels.quant_pack import dequantize, quantize_reference


class FaithfulQuantizedAttention:
    """One layer's reference for a spec ``quantize`` config (kivi or gear)."""

    def __init__(self, config):
        if config.method not in ("kivi", "gear"):
            raise ValueError(f"no faithful reference for quantize method {config.method!r}")
        self.config = config
        self.prompt_length: int | None = None
        self.quantized: tuple[int, int] = (0, 0)  # (keys, values) fake-quantized at the last step

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float,
                 softcap: float = 0.0) -> Tensor:
        """q ``[B, Hq, Tq, D]``; k/v ``[B, Hkv, N, D]`` every token so far; mask additive or bool ``[B|1, 1|Hq, Tq,
        N]`` or None (causal). Returns ``[B, Hq, Tq, Dv]`` in q's dtype."""
        n = k.shape[2]
        if self.prompt_length is None:
            if q.shape[2] != n:
                raise ValueError("the reference expects the whole prompt first")
            self.prompt_length = n
            keys, values = k.float(), v.float()
        else:
            if q.shape[2] != 1:
                raise ValueError("the reference decodes one token at a time")
            keys, values = self.fake_quantized(k, "keys"), self.fake_quantized(v, "values")
        return _attention(q.float(), keys, values, mask, scale, softcap).to(q.dtype)

    def quantized_count(self, kind: str, n: int) -> int:
        """Tokens of ``kind`` quantized when a decode step attends ``n`` tokens."""
        r = self.config.residual
        if self.config.method == "kivi" and kind == "values":
            return max(0, n - 1 - r)
        return (n - 1) // r * r

    def fake_quantized(self, x: Tensor, kind: str) -> Tensor:
        """float32 ``x [B, Hkv, N, D]`` with its quantized share replaced by its reconstruction."""
        n = x.shape[2]
        count = self.quantized_count(kind, n)
        self.quantized = (count, self.quantized[1]) if kind == "keys" else (self.quantized[0], count)
        parts = [self._reconstruct(x[:, :, start:stop], kind, rank) for start, stop, rank in self._blocks(count)]
        return torch.cat(parts + [x[:, :, count:].float()], dim=2)

    def _blocks(self, count: int) -> list[tuple[int, int, int | None]]:
        """(start, stop, rank) of the separately compressed blocks covering the first ``count`` tokens."""
        c = self.config
        if count == 0:
            return []
        if c.method == "kivi":
            return [(0, count, None)]
        prompt = self.prompt_length // c.residual * c.residual
        blocks = [(0, prompt, c.prefill_rank)] if prompt else []
        blocks += [(start, start + c.residual, c.rank) for start in range(prompt, count, c.residual)]
        return blocks

    def _reconstruct(self, x: Tensor, kind: str, rank: int | None) -> Tensor:
        c = self.config
        if c.method == "kivi":
            return dequantize(quantize_reference(x, kind, c.bits, c.group))
        packed, terms = gear_compress_reference(x, kind, c.bits, c.group, rank, c.outliers, lr_block=c.residual)
        return gear_reconstruct(packed, terms)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float) -> Tensor:
    """Plain float32 attention with GQA; a query row with nothing to attend gives zeros."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = q @ k.transpose(-1, -2) * scale  # [B, Hq, Tq, N]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    tq, n = logits.shape[-2:]
    if mask is None:
        allowed = torch.ones(tq, n, dtype=torch.bool, device=q.device).tril(n - tq)
        logits = logits.masked_fill(~allowed, float("-inf"))
    elif mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        additive = mask.float()
        logits = logits + additive.masked_fill(additive <= torch.finfo(mask.dtype).min / 2, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1))
    return probs @ v


def register_faithful_quantized_attention(layers: dict[int, FaithfulQuantizedAttention],
                                          name: str = "kvfx_faithful_quantized") -> str:
    """Install ``layers`` (by layer index) as a transformers attention implementation called ``name``; set
    ``model.config._attn_implementation = name`` to use it. Masks are built as for eager attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    def attention(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = layers[module.layer_idx](query, key, value, attention_mask, scale=scale, softcap=softcap or 0.0)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
    return name
