"""Host time per call of kvfx's decode path, piece by piece, at a shape too small for the GPU to matter.

    python benchmarks/host_overhead.py

A small-batch decode step is bound by the host: each layer's kvfx::attention call costs Python and launch time
while its kernels take microseconds. Each line is the wall time per call over --calls calls (the GPU synchronised
once at the end), B=1, T ~ 512, 32/8 heads, d=64, bf16. A diagnosis tool: no goal is judged on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--cprofile", default="", help="comma-separated spec names to profile with cProfile as well")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_overhead: CUDA is not available", file=sys.stderr)
        return 2
    import kvfx.ops  # noqa: F401  (registers the ops)
    from kvfx.kernels import decode_attention as da
    from kvfx.plans import register_plan
    from kvfx.spec import Spec
    from kvfx.state import REGISTRY, LayerCache

    B, Hq, Hkv, D, T = 1, 32, 8, 64, 512
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, Hq, D, device=dev, dtype=dt)
    k = torch.randn(B, Hkv, T + 64, D, device=dev, dtype=dt)
    mask = torch.ones(B, T, device=dev, dtype=torch.bool)
    lines = []

    def report(name, us):
        lines.append(f"{name:<58}{us:8.1f} us")
        print(lines[-1], flush=True)

    report("torch.empty x3", per_call_us(lambda: (torch.empty(B, Hq, D, device=dev), torch.empty(B, Hq, 4, D,
                                                  device=dev), torch.empty(B, Hq, 4, device=dev)), a.calls))
    for splits in (1, None):
        for tune in ("0", "1"):
            os.environ["KVFX_DECODE_AUTOTUNE"] = tune
            report(f"decode_attention splits={splits} autotune={tune}",
                   per_call_us(lambda: da.decode_attention(q, k, k, T, mask=mask, num_splits=splits), a.calls))
    os.environ["KVFX_DECODE_AUTOTUNE"] = "1"
    cache = LayerCache()
    cache.append(k[:, :, :T], k[:, :, :T])
    new = torch.randn(B, Hkv, 1, D, device=dev, dtype=dt)

    def append():
        cache.append(new, new)
        cache.end -= 1

    report("LayerCache.append (one token)", per_call_us(append, a.calls))

    specs = {"identity": {"version": 1},
             "window 0.5": {"version": 1, "default": {"evict": {"method": "window", "budget": 0.5}}},
             "h2o 0.5": {"version": 1, "default": {"evict": {"method": "h2o", "budget": 0.5}}},
             "kivi-4": {"version": 1, "default": {"quantize": {"method": "kivi", "bits": 4}}}}
    qq = torch.randn(B, Hq, T, D, device=dev, dtype=dt)
    kk = torch.randn(B, Hkv, T, D, device=dev, dtype=dt)
    for name, spec in specs.items():
        plan_id = register_plan(Spec.from_dict(spec), num_layers=1, num_kv_heads=Hkv)
        handle = REGISTRY.begin(q, plan_id)
        torch.ops.kvfx.attention(qq, kk, kk, handle, None, 0, D**-0.5, 0.0, True, 0, False, False, None, [], [])
        seen = [T]

        def step():
            past = handle.expand(B, Hkv, seen[0], D)
            row = torch.ones(B, 1, 1, seen[0] + 1, device=dev, dtype=torch.bool)
            torch.ops.kvfx.attention(q[:, :, None], new, new, past, row, 0, D**-0.5, 0.0, False, 0, True, False,
                                     None, [], [])
            seen[0] += 1

        report(f"kvfx::attention decode, {name} (+ a mask row)", per_call_us(step, min(a.calls, 300)))
        if name in a.cprofile.split(","):
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                step()
            torch.cuda.synchronize()
            prof.disable()
            print(f"== cProfile: 200 decode calls, {name}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        handle = None
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
