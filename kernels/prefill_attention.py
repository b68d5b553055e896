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
    """Exactly the attention transformers computes, over the given (already updated) cache.

    Without a mask (causal or none), CUDA half-precision inputs that flash attention takes go to it unexpanded
    (``enable_gqa``): expanding them costs 2 * Hq / Hkv times the new keys' bytes (2 GiB at B=8, T=32768, 32/8 heads,
    d=64). Otherwise KV heads are expanded for their query groups (as transformers' repeat_kv does): with a mask, or
    where flash cannot run, SDPA's GQA mode falls back to the math kernel on CUDA, which materialises the
    [B, Hq, Tq, Tk] scores (seen: 285 MB peak for a 4096-token prompt of codelm-27m, against 104 MB). A long
    prompt's mask is taken in chunks of query rows (:data:`MASK_CHUNK_BYTES`): SDPA's converted copy of a whole
    [B, 1, T, T] mask ran an 80 GB H100 out of memory at B=8, T=32768.
    """
    if softcap == 0.0:
        if mask is None and _flash_gqa(q, k, v, is_causal):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, enable_gqa=True)
        k, v = repeat_kv(k, q.shape[1]).to(q.dtype), repeat_kv(v, q.shape[1]).to(q.dtype)
        rows = _rows_per_chunk(q, k, mask, is_causal)
        if rows >= q.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal)
        # query rows are independent: attend chunk by chunk, each with its rows of the mask
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        for start in range(0, q.shape[2], rows):
            end = start + rows
            out[:, :, start:end] = F.scaled_dot_product_attention(
                q[:, :, start:end], k, v, attn_mask=mask[:, :, start:end], scale=scale)
        return out
    return attention_math(q, k, v, mask=mask, scale=scale, softcap=softcap, is_causal=is_causal)


# SDPA turns a bool mask into an additive one of the same shape in q's dtype, and pads a float one: for a whole
# [B, 1, T, T] prompt mask that is B * T * T * 2 bytes (16 GiB at B=8, T=32768, on top of the mask itself). Query
# rows are attended in chunks whose slice of the mask, so converted, stays under this many bytes.
MASK_CHUNK_BYTES = 512 * 2**20


def _rows_per_chunk(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> int:
    """Query rows per SDPA call: all of them, unless a per-row mask would be converted at a size above
    MASK_CHUNK_BYTES (a multiple of 128 rows then, at least 128)."""
    tq = q.shape[2]
    if is_causal or mask is None or mask.dim() != 4 or mask.shape[2] == 1:
        return tq
    per_row = max(mask.shape[0], q.shape[0]) * mask.shape[1] * k.shape[2] * q.element_size()
    rows = MASK_CHUNK_BYTES // max(per_row, 1) // 128 * 128
    return max(rows, 128)


def _flash_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> bool:
    """Whether flash attention would take these unmasked inputs with ``enable_gqa`` (SDPA's own check)."""
    if not q.is_cuda or q.shape[1] == k.shape[1] or not q.dtype == k.dtype == v.dtype:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or not torch.backends.cuda.flash_sdp_enabled():
        return False
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    params = SDPAParams(q, k, v, None, 0.0, is_causal, True)  # (no mask, no dropout, enable_gqa)
    return can_use_flash_attention(params, False)


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, heads, T, D], query head h reading KV head h // (heads // Hkv)."""
    b, hkv, t, d = x.shape
    if hkv == heads:
        return x
    return x[:, :, None].expand(b, hkv, heads // hkv, t, d).reshape(b, heads, t, d)


def attention_math(q, k, v, *, mask=None, scale: float, softcap: float = 0.0, is_causal: bool = False):
    """The eager formula: ``softmax(cap(q k^T * scale) + mask) v`` with the softmax in float32.

    ``is_causal`` follows SDPA's convention (the causal mask is aligned to the top-left corner).
    """
    k = repeat_kv(k, q.shape[1]).to(q.dtype)  # [B, Hq, Tk, D]
    v = repeat_kv(v, q.shape[1]).to(q.dtype)
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
