"""Launch-shape sweep of the ragged (RazorAttention) decode kernel at the goal's shape: B=8 T=32768 Hq=32 Hkv=8
D=128 bf16, R = 1 and 2 retrieval heads of 8, the others sink 4 + window T/5 + a compensation token.

    python benchmarks/ragged_sweep.py          # prints one line per (R, BLOCK_N, warps, stages, splits)
    python benchmarks/ragged_sweep.py --configs 64,4,2/128,4,2 --splits none,16,24 --flush read

Times CUDA-graph replays with the L2 flushed (benchmarks/decode_eviction.py's timer), the comp buffers passed as
the cache holds them (float32). Writes benchmarks/results/ragged_sweep_<gpu>.txt (or $KVFX_RESULTS_DIR)."""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_eviction import FLUSHES, _time_ms, l2_flush  # noqa: E402

from kvfx.results import gpu_slug, results_path  # noqa: E402

CONFIGS = [(64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 2), (32, 4, 3), (32, 4, 4)]
SPLITS = [None, 12, 16, 24, 32, 48, 64]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=None, help="BLOCK_N,warps,stages triples joined by '/' (default: all)")
    p.add_argument("--splits", default=None, help="comma-separated split counts, 'none' = the kernel's own")
    p.add_argument("--flush", choices=FLUSHES, default="memset", help="decode_eviction.l2_flush")
    a = p.parse_args(argv)
    configs = CONFIGS if a.configs is None else [tuple(int(x) for x in c.split(",")) for c in a.configs.split("/")]
    splits_list = SPLITS if a.splits is None else [None if x.strip() == "none" else int(x) for x in a.splits.split(",")]
    if not torch.cuda.is_available():
        print("ragged_sweep: CUDA is not available", file=sys.stderr)
        return 2
    from kvfx.eviction.ragged_cache import RaggedLayerCache
    from kvfx.kernels import ragged_decode_attention as rda
    from kvfx.spec import EvictRazor

    B, T, Hq, Hkv, D = 8, 32768, 32, 8, 128
    torch.manual_seed(0)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    k_full = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    v_full = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    flush = l2_flush(a.flush, "cuda")
    sdpa = _time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_full, v_full,
                                                                             enable_gqa=True), 10, 50, flush,
                    graph=True)
    lines = [f"GPU {torch.cuda.get_device_name()}  sdpa_gqa_full {sdpa * 1e3:.1f} us"]
    print(lines[0], flush=True)
    original = rda._fixed_gpu_config
    best = {}
    for retrieval in (1, 2):
        cache = RaggedLayerCache(0, [h < retrieval for h in range(Hkv)], EvictRazor(profile="unused.json"))
        cache.compress_prompt(None, k_full, v_full, None)
        new = torch.randn(B, Hkv, 1, D, device="cuda", dtype=torch.bfloat16)
        cache.decode(q[:, :, None], new, new, None, scale=D**-0.5, softcap=0.0)  # grow once, as decoding does
        for block_n, warps, stages in configs:
            rda._fixed_gpu_config = lambda *_a, c=(block_n, warps, stages): dict(BLOCK_N=c[0], num_warps=c[1],
                                                                                 num_stages=c[2])
            for splits in splits_list:
                def kernel():
                    return rda.ragged_decode_attention(q, cache.k, cache.v, cache.pos, cache.offsets, cache.lengths,
                                                       cache.comp_k, cache.comp_v, cache.comp_n, scale=D**-0.5,
                                                       max_length=cache._max_length(), num_splits=splits)
                try:
                    ms = _time_ms(kernel, 5, 50, flush, graph=True)
                except Exception as e:  # a config that does not fit: say so and go on
                    lines.append(f"R={retrieval} n{block_n} w{warps} s{stages} splits {splits}: {type(e).__name__}")
                    print(lines[-1], flush=True)
                    continue
                line = (f"R={retrieval} n{block_n:<3} w{warps} s{stages} splits {str(splits):>4}  "
                        f"{ms * 1e3:7.1f} us  {sdpa / ms:.2f}x  kept {cache.kept_bytes / ms / 1e9:.2f} TB/s")
                lines.append(line)
                print(line, flush=True)
                if retrieval not in best or ms < best[retrieval][0]:
                    best[retrieval] = (ms, block_n, warps, stages, splits)
        rda._fixed_gpu_config = original
        del cache
        torch.cuda.empty_cache()
    for r, (ms, *c) in best.items():
        lines.append(f"best R={r}: {ms * 1e3:.1f} us ({sdpa / ms:.2f}x) with BLOCK_N, warps, stages, splits = {c}")
        print(lines[-1])
    at15 = (6 * best[1][0] + 2 * best[2][0]) / 8
    lines.append(f"best at 15% (6 x R=1 + 2 x R=2): {at15 * 1e3:.1f} us ({sdpa / at15:.2f}x)")
    print(lines[-1])
    path = results_path(f"ragged_sweep_{gpu_slug(torch.cuda.get_device_name())}.txt")
    path.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
