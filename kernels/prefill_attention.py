"""Attention of several query tokens over a KV cache (prefill, chunked prefill): a plain torch path.

Prefill is compute-bound and already served well by ``scaled_dot_product_attention``; kvfx uses it directly and
keeps a math path for what SDPA cannot express (logit softcapping). Tensors in, tensors out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(
    q: torch.Tensor,  # [B, Hq, Tq, D]
    k: torch.Tensor,  # [B, Hkv, Tk, D]
    v: torch.Tensor,  # [B, Hkv, Tk, Dv]
    *,
    mask: torch.Tensor | None = None,  # broadcastable to [B, Hq, Tq, Tk]; bool (True = attend) or additive float
    scale: float,
    softcap: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:  # [B, Hq, Tq, Dv]
    """Exactly the attention transformers computes, over the given (already updated) cache."""
    if softcap == 0.0:
        return F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, is_causal=is_causal,
            enable_gqa=q.shape[1] != k.shape[1],
        )
    return attention_math(q, k, v, mask=mask, scale=scale, softcap=softcap, is_causal=is_causal)


def attention_math(q, k, v, *, mask=None, scale: float, softcap: float = 0.0, is_causal: bool = False):
    """The eager formula: ``softmax(cap(q k^T * scale) + mask) v`` with the softmax in float32.

    ``is_causal`` follows SDPA's convention (the causal mask is aligned to the top-left corner).
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).to(q.dtype)  # [B, Hq, Tk, D]
    v = v.repeat_interleave(group, dim=1).to(q.dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hq, Tq, Tk]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        tq, tk = scores.shape[-2:]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
