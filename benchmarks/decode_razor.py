"""Razor decode vs the full cache: SDPA-GQA over all T tokens vs kvfx's ragged head-wise decode attention, where R of
a layer's KV heads keep all T tokens and the others sink + window (T / 5) + a compensation token.

    python benchmarks/decode_razor.py                  # B=8 T=32768 Hq=32 Hkv=8 D=128 bf16, R = 1 and 2 of 8

15% retrieval heads over a model of 8 such layers is 10 of 64 KV heads: 6 layers with R = 1 and 2 with R = 2, so
the per-layer time at 15% is (6 t(R=1) + 2 t(R=2)) / 8. Paths per R:
  kvfx_ragged_attention  the ragged decode kernel alone (kernels/ragged_decode_attention.py)
  kvfx_razor_step        the whole per-layer step (RaggedLayerCache.decode: one write kernel folds the window's
                         oldest token into the compensation token and writes the new one, then the attention)
Timers as benchmarks/decode_eviction.py: CUDA-graph replays (the goal's timer) and eager calls, the L2 flushed
before each call, once per flush mode (default both: ``read``, which leaves clean lines as a decoder's weight reads
do, and ``memset``, which leaves dirty lines the timed call must write back), each mode with its own SDPA baseline.
Writes benchmarks/results/decode_razor_<gpu>.json.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_eviction import _time_both, add_flush_option, flush_modes, l2_flush  # noqa: E402

from kvfx.results import gpu_environment, gpu_slug, results_path, write_json  # noqa: E402


def bench_flush(flush_mode: str, q, k_full, v_full, reps: int) -> dict:
    """Every timing of one flush mode, its own SDPA baseline included (one run, side by side)."""
    from kvfx.eviction.ragged_cache import RaggedLayerCache
    from kvfx.kernels.ragged_decode_attention import ragged_decode_attention
    from kvfx.spec import EvictRazor

    B, Hq, D = q.shape
    Hkv = k_full.shape[1]
    flush = l2_flush(flush_mode, q.device)
    sdpa = _time_both(lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_full, v_full,
                                                                                enable_gqa=True), 10, reps, flush)
    print(f"L2 flush: {flush_mode}")
    print(f"  sdpa_gqa_full          graph {sdpa['graph']:.4f} ms   eager {sdpa['eager']:.4f} ms")
    config = EvictRazor(profile="unused.json")  # the defaults: sink 4, min_window 256, compress_ratio 5
    results = {}
    for retrieval in (1, 2):
        cache = RaggedLayerCache(0, [h < retrieval for h in range(Hkv)], config)
        cache.compress_prompt(None, k_full, v_full, None)
        new = torch.randn(B, Hkv, 1, D, device=q.device, dtype=q.dtype)

        def kernel():
            return ragged_decode_attention(q, cache.k, cache.v, cache.pos, cache.offsets, cache.lengths,
                                           cache.comp_k, cache.comp_v, cache.comp_n,
                                           scale=D**-0.5, max_length=cache._max_length())

        ms = {"kvfx_ragged_attention": _time_both(kernel, 10, reps, flush),
              "kvfx_razor_step": _time_both(lambda: cache.decode(q[:, :, None], new, new, None, scale=D**-0.5,
                                                                 softcap=0.0), 10, reps, flush)}
        kept = cache.kept_bytes
        results[retrieval] = dict(retrieval_heads=retrieval, window=cache.window, kept_bytes=kept,
                                  full_bytes=2 * k_full.numel() * k_full.element_size(), ms=ms,
                                  speedup={n: {t: sdpa[t] / v[t] for t in v} for n, v in ms.items()})
        for n, v in ms.items():
            print(f"  R={retrieval} {n:<22} graph {v['graph']:.4f} ms ({sdpa['graph'] / v['graph']:.2f}x)   "
                  f"eager {v['eager']:.4f} ms ({sdpa['eager'] / v['eager']:.2f}x)   kept {kept / 1e9:.3f} GB")
        del cache
        torch.cuda.empty_cache()
    at15 = {n: {t: (6 * results[1]["ms"][n][t] + 2 * results[2]["ms"][n][t]) / 8 for t in ("graph", "eager")}
            for n in results[1]["ms"]}
    for n, v in at15.items():
        print(f"  15% (10 of 64 heads) {n:<22} graph {v['graph']:.4f} ms ({sdpa['graph'] / v['graph']:.2f}x)")
    return {"sdpa_gqa_full_ms": sdpa, "per_retrieval_count": results, "at_15_percent_ms": at15,
            "at_15_percent_speedup": {n: {t: sdpa[t] / v[t] for t in v} for n, v in at15.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--reps", type=int, default=100)
    add_flush_option(p)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_razor_<gpu>.json)")
    a = p.parse_args(argv)
    modes = flush_modes(p, a.flush)
    if not torch.cuda.is_available():
        print("decode_razor: CUDA is not available", file=sys.stderr)
        return 2

    B, T, Hq, Hkv, D = 8, a.seq, 32, 8, 128
    dev, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    k_full = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype)
    v_full = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype)
    print(f"GPU {torch.cuda.get_device_name()}; B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} bf16")
    by_flush = {mode: bench_flush(mode, q, k_full, v_full, a.reps) for mode in modes}
    payload = {**gpu_environment(), "shape": dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype="bf16"),
               "timer": f"CUDA events, median of {a.reps} single calls after 10 warm-up calls, the L2 flushed before "
                        "each (per flush mode, see decode_eviction.l2_flush); graph: one CUDA-graph replay, eager: "
                        "launched from Python",
               "flushes": by_flush}
    path = write_json(a.out or results_path(f"decode_razor_{gpu_slug(torch.cuda.get_device_name())}.json"), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
