"""Where the slot-store decode attention loses bandwidth: every launch configuration and split count of the plain and
the scored decode kernels over a ``budget * T``-slot store, beside the device's copy bandwidth and SDPA-GQA over a
dense cache of the same size (CUDA-graph replays, L2 flushed, median of --reps).

    python benchmarks/decode_kernel_configs.py --budget 0.2 --splits 8,12,16,24
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_eviction import _time_ms  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--splits", default="8,12,16,24")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)
    import kvfx.kernels.decode_attention as da
    import kvfx.kernels.scored_decode_attention as sda

    B, Hq, Hkv, D = 8, 32, 8, 128
    S = round(a.budget * a.seq) + 1
    dev, dtype = "cuda", torch.bfloat16
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
    nbytes = 2 * k.numel() * k.element_size()
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=dev)
    dst = torch.empty_like(k)

    def report(name, ms, moved=nbytes):
        print(f"{name:<48}{ms * 1e3:8.1f} us {moved / (ms * 1e-3) / 1e12:6.2f} TB/s", flush=True)

    report("copy k -> dst (read + write)", _time_ms(lambda: dst.copy_(k), 5, a.reps, flush, graph=True))
    report("sdpa_gqa dense, same size", _time_ms(
        lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True), 5, a.reps, flush, graph=True))
    bias = torch.zeros(B, 1, S, device=dev)
    da._autotune_enabled = lambda: False
    for cfg in da._autotune_configs():
        fixed = dict(BLOCK_N=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if da._smem_bytes(fixed["BLOCK_N"], D, 2, fixed["num_stages"]) > da._SMEM_BUDGET:
            continue
        da._fixed_gpu_config = lambda *_, c=fixed: c
        sda._fixed_gpu_config = lambda *_, c=fixed: c
        for splits in (int(x) for x in a.splits.split(",")):
            tag = f"n{fixed['BLOCK_N']} w{fixed['num_warps']} s{fixed['num_stages']} splits {splits}"
            plain = _time_ms(lambda: da.decode_attention(q, k, v, S, scale=D**-0.5, num_splits=splits), 3, a.reps,
                             flush, graph=True)
            scored = _time_ms(lambda: sda.scored_decode_attention(q, k, v, bias, scale=D**-0.5, num_splits=splits),
                              3, a.reps, flush, graph=True)
            report(f"plain  {tag}", plain)
            report(f"scored {tag}", scored)


if __name__ == "__main__":
    main()
