"""Shared drivers for eviction tests: run the slot cache (fast path) and the paper-faithful reference side by
side on the same attention inputs, step by step."""

from __future__ import annotations

import math

import torch

from kvfx.eviction import make_policy
from kvfx.eviction.faithful import FaithfulAttention
from kvfx.eviction.slot_cache import EvictingLayerCache
from kvfx.kernels.prefill_attention import prefill_attention


def alibi(heads: int, length: int) -> torch.Tensor:
    """An ALiBi bias ``[1, H, T, T]`` (MPT's slopes), causal entries only; -inf above the diagonal."""
    slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])
    distance = torch.arange(length).view(1, -1) - torch.arange(length).view(-1, 1)  # j - i
    bias = slopes.view(heads, 1, 1) * distance.view(1, length, length).float()
    return bias.masked_fill(distance > 0, float("-inf")).unsqueeze(0)


def run_side_by_side(configs, *, batch=2, q_heads=4, kv_heads=2, head_dim=16, prompt=24, steps=12, pads=(0, 3),
                     mask_kind="bool", window=0, softcap=0.0, seed=0, device="cpu", dtype=torch.float32,
                     atol=1e-5, rtol=1e-5, layer=0, inv_freq=None):
    """Drive both implementations through a prompt and ``steps`` decode steps; assert equal outputs and kept
    sets after every step. Returns the fast cache. ``window`` > 0 adds a sliding-window mask."""
    gen = torch.Generator().manual_seed(seed)
    total = prompt + steps
    q = torch.randn(batch, q_heads, total, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, total, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, total, head_dim, generator=gen)
    q, k, v = (x.to(dtype).float() for x in (q, k, v))  # both sides see the same (rounded) inputs
    real = torch.ones(batch, total, dtype=torch.bool)
    for row, pad in enumerate(pads[:batch]):
        real[row, :pad] = False
    full_bias = alibi(q_heads, total) if mask_kind == "alibi" else None

    def mask(start, stop):
        qpos, kpos = torch.arange(start, stop).view(-1, 1), torch.arange(stop).view(1, -1)
        allowed = (kpos <= qpos) & (kpos > qpos - window if window else True)
        allowed = allowed[None, None] & real[:, None, None, :stop]  # [B, 1, Tq, Tk]
        if mask_kind == "bool":
            return allowed
        if mask_kind == "float":
            return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        if mask_kind == "alibi":
            return full_bias[:, :, start:stop, :stop].masked_fill(~allowed, torch.finfo(torch.float32).min)
        raise ValueError(mask_kind)

    def on(x):
        return x.to(device=device, dtype=dtype)

    fast = EvictingLayerCache(layer, [make_policy(c) for c in configs], keep_last=window)
    reference = FaithfulAttention(layer, configs, inv_freq=inv_freq)
    scale = 1 / math.sqrt(head_dim)
    m = mask(0, prompt)
    fast_out = prefill_attention(on(q[:, :, :prompt]), on(k[:, :, :prompt]), on(v[:, :, :prompt]), mask=m.to(device),
                                 scale=scale, softcap=softcap) if not softcap else None
    fast.compress_prompt(on(q[:, :, :prompt]), on(k[:, :, :prompt]), on(v[:, :, :prompt]), m.to(device),
                         scale=scale, softcap=softcap, is_causal=False)
    ref_out = reference(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], m, scale=scale, softcap=softcap)
    if fast_out is not None:
        rows = real[:, :prompt].view(batch, 1, prompt, 1)
        torch.testing.assert_close((fast_out.float().cpu() * rows), ref_out * rows, atol=atol, rtol=rtol)
    assert fast.kept_positions() == reference.kept_positions(), "after the prompt"
    for t in range(prompt, total):
        m = mask(t, t + 1)
        first = max(0, t + 1 - window) if window else 0  # a sliding-window cache holds only the window
        out = fast.decode(on(q[:, :, t:t + 1]), on(k[:, :, t:t + 1]), on(v[:, :, t:t + 1]), m.to(device),
                          scale=scale, softcap=softcap, inv_freq=None if inv_freq is None else inv_freq.to(device))
        expected = reference(q[:, :, t:t + 1], k[:, :, first:t + 1], v[:, :, first:t + 1], m[..., first:],
                             scale=scale, softcap=softcap)
        torch.testing.assert_close(out.float().cpu(), expected, atol=atol, rtol=rtol,
                                   msg=lambda text: f"decode step {t - prompt}: {text}")
        assert fast.kept_positions() == reference.kept_positions(), f"after decode step {t - prompt}"
    return fast
