"""Counter-based Gumbel(0, 1) noise, identical in torch and in Triton kernels.

Keyformer adds fresh Gumbel noise to every attention logit it scores. kvfx does not draw it from a stateful
generator: the noise of one logit is a hash of (seed, layer, batch row, query head, query position, key position),
so it is reproducible from the seed, independent of the cache's slot layout (a key keeps its noise wherever it is
stored) and can be recomputed inside a kernel without reading a noise tensor::

    row  = mix(qpos + mix(hq + mix(b + mix(layer + mix(seed)))))     # per (row, query head, query): scalars
    bits = mix(row ^ mix(kpos))                                        # per key: two rounds of the hash
    u    = min(fp32((bits >> 8) + 0.5) / 2**24, 1 - 2**-24)           # uniform in (0, 1), never 0 or 1
    g    = -log(-log(u))                                               # Gumbel(0, 1), in [-2.8, 16.6]

``mix`` is Chris Wellons' "lowbias32" integer hash over uint32 (all arithmetic modulo 2**32).  ``(bits >> 8) + 0.5``
needs 25 significant bits: in float32 it rounds (ties to even, the same in torch and in Triton), and its largest value
``2**24 - 0.5`` rounds to ``2**24``, i.e. u = 1 and g = +inf (once in 2**24 logits, which a long prefill meets); the
clamp maps that one value to the largest float32 below 1 and leaves every other value unchanged.

The Triton helpers are device functions for other kernels.  They are made with :class:`kvfx.kernels.device_function.DeviceFunction` rather than
``@triton.jit`` so that they also work inside *interpreted* kernels (CPU tensors) when triton was imported without
``TRITON_INTERPRET=1``: a plain ``JITFunction`` refuses to be called from Python, which is what the interpreter does.
"""

from __future__ import annotations

import torch
import triton.language as tl

from kvfx.kernels.device_function import DeviceFunction

__all__ = ["gumbel_noise_reference", "gumbel_row_key", "gumbel_noise"]

_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_U_MAX = 1.0 - 2.0**-24  # the largest float32 below 1


def _mix_torch(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def _as_i64(value) -> torch.Tensor:
    return value.to(torch.int64) if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.int64)


def gumbel_noise_reference(seed: int, layer: int, b, hq, qpos, kpos) -> torch.Tensor:
    """Gumbel(0, 1) noise in float32 for broadcastable integer tensors (or ints) b, hq, qpos, kpos."""
    row = _mix_torch(_as_i64(layer) + _mix_torch(_as_i64(seed)))
    row = _mix_torch(_as_i64(b) + row)
    row = _mix_torch(_as_i64(hq) + row)
    row = _mix_torch(_as_i64(qpos) + row)
    bits = _mix_torch(row ^ _mix_torch(_as_i64(kpos)))
    u = (((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)).clamp_max(_U_MAX)
    return -torch.log(-torch.log(u))


@DeviceFunction
def _mix(x):
    """lowbias32 on a uint32 tensor (wraps modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@DeviceFunction
def gumbel_row_key(seed, layer, b, hq, qpos):
    """The per-(row, query head, query) part of the hash, as uint32 (scalars or tensors)."""
    row = _mix(layer.to(tl.uint32) + _mix(seed.to(tl.uint32)))
    row = _mix(b.to(tl.uint32) + row)
    row = _mix(hq.to(tl.uint32) + row)
    return _mix(qpos.to(tl.uint32) + row)


@DeviceFunction
def gumbel_noise(row_key, kpos):
    """Gumbel(0, 1) float32 noise for a row key (from ``gumbel_row_key``) and key positions."""
    bits = _mix(row_key ^ _mix(kpos.to(tl.uint32)))
    u = tl.minimum(((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994039535522)  # 1 - 2**-24
    return -tl.log(-tl.log(u))
