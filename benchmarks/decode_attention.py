"""Decode attention benchmark: kvfx fused kernel vs SDPA (enable_gqa) vs the repeat_kv path.

    python benchmarks/decode_attention.py                    # B=8 T=32768 Hq=32 Hkv=8 D=128 bf16
    python benchmarks/decode_attention.py --sweep            # plus a few other T / B sizes
    python benchmarks/decode_attention.py --splits 4 8 16 32 # also time fixed num_splits values

One query token per sequence against a full KV cache [B, Hkv, T, D].  Times are medians
of ``triton.testing.do_bench`` after warm-up (which also runs kvfx's autotuning).  The
effective bandwidth counts the K and V bytes read once (the cache size); the repeat_kv
path reads more than that (and writes the repeated copies), so its TB/s figure is the
same "useful bytes / time" metric, not the bytes it actually moves.
Writes benchmarks/results/decode_attention_<gpu-name-slug>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from kvfx.results import gpu_environment, gpu_slug, results_path, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sdpa_gqa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def _sdpa_repeat_kv(q, k, v):
    # transformers' repeat_kv: expand the KV heads to Hq heads (a copy), then SDPA
    B, Hkv, T, D = k.shape
    G = q.shape[1] // Hkv
    kr = k[:, :, None].expand(B, Hkv, G, T, D).reshape(B, Hkv * G, T, D)
    vr = v[:, :, None].expand(B, Hkv, G, T, D).reshape(B, Hkv * G, T, D)
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kr, vr)[:, :, 0]


def bench_case(B, T, Hq, Hkv, D, dtype, splits=(), warmup_ms=100, rep_ms=500, cuda_graph=False):
    import triton
    import triton.testing

    from kvfx.kernels.decode_attention import decode_attention, default_num_splits

    dev = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype)
    kv_bytes = 2 * k.numel() * k.element_size()

    # correctness first: kvfx vs SDPA (both against an fp32 SDPA)
    t0 = time.time()
    out = decode_attention(q, k, v, T)  # first call compiles + autotunes
    torch.cuda.synchronize()
    first_call_s = time.time() - t0
    sdpa = _sdpa_gqa(q, k, v)
    exact = _sdpa_gqa(q.float(), k.float(), v.float())
    denom = exact.abs().max().item()
    rel_err_vs_sdpa = (out.float() - sdpa.float()).abs().max().item() / max(sdpa.float().abs().max().item(), 1e-30)
    rel_err_kvfx_vs_fp32 = (out.float() - exact).abs().max().item() / max(denom, 1e-30)
    rel_err_sdpa_vs_fp32 = (sdpa.float() - exact).abs().max().item() / max(denom, 1e-30)
    del exact

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        if cuda_graph:  # replays a captured graph: no Python launch overhead in the figure
            return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")

    ms = {
        "sdpa_gqa": timed(lambda: _sdpa_gqa(q, k, v)),
        "repeat_kv_sdpa": timed(lambda: _sdpa_repeat_kv(q, k, v)),
        "kvfx": timed(lambda: decode_attention(q, k, v, T)),
    }
    best = None  # the autotuner's pick for the default launch (read before other launches)
    try:
        import importlib

        _mod = importlib.import_module("kvfx.kernels.decode_attention")

        decode_attention(q, k, v, T)
        bc = getattr(_mod._SPLIT_TUNED, "best_config", None)
        best = str(bc) if bc is not None else None
    except Exception:  # pragma: no cover - informational only
        pass
    split_ms = {}
    for s in splits:
        split_ms[str(s)] = timed(lambda s=s: decode_attention(q, k, v, T, num_splits=s))

    sm = torch.cuda.get_device_properties(dev).multi_processor_count

    res = {
        "shape": dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype).replace("torch.", "")),
        "kv_bytes": kv_bytes,
        "ms": ms,
        "tb_per_s": {k_: kv_bytes / (t * 1e-3) / 1e12 for k_, t in ms.items()},
        "speedup_kvfx_vs_sdpa_gqa": ms["sdpa_gqa"] / ms["kvfx"],
        "speedup_kvfx_vs_repeat_kv": ms["repeat_kv_sdpa"] / ms["kvfx"],
        "kvfx_default_num_splits": default_num_splits(B, Hkv, T, sm),
        "kvfx_best_config": best,
        "kvfx_first_call_s": first_call_s,
        "kvfx_ms_by_num_splits": split_ms,
        "rel_err_kvfx_vs_sdpa": rel_err_vs_sdpa,
        "rel_err_kvfx_vs_fp32": rel_err_kvfx_vs_fp32,
        "rel_err_sdpa_vs_fp32": rel_err_sdpa_vs_fp32,
    }
    del q, k, v, out, sdpa
    torch.cuda.empty_cache()
    return res


def _print_case(r):
    s = r["shape"]
    print(
        f"\nB={s['B']} T={s['T']} Hq={s['Hq']} Hkv={s['Hkv']} D={s['D']} {s['dtype']}  "
        f"KV cache {r['kv_bytes'] / 1e9:.3f} GB  kvfx num_splits={r['kvfx_default_num_splits']}"
        f"  best config: {r['kvfx_best_config']}"
    )
    print(
        f"  max rel err: kvfx vs sdpa {r['rel_err_kvfx_vs_sdpa']:.2e}   vs fp32: kvfx {r['rel_err_kvfx_vs_fp32']:.2e}"
        f"  sdpa {r['rel_err_sdpa_vs_fp32']:.2e}"
    )
    print(f"  {'path':<22}{'ms':>10}{'TB/s':>9}{'kvfx speedup':>15}")
    for name in ("sdpa_gqa", "repeat_kv_sdpa", "kvfx"):
        t = r["ms"][name]
        print(f"  {name:<22}{t:>10.4f}{r['tb_per_s'][name]:>9.2f}{t / r['ms']['kvfx']:>14.2f}x")
    for s_, t in r["kvfx_ms_by_num_splits"].items():
        print(f"  {'kvfx num_splits=' + s_:<22}{t:>10.4f}{r['kv_bytes'] / (t * 1e-3) / 1e12:>9.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", "-B", type=int, default=8)
    p.add_argument("--seq", "-T", type=int, default=32768, help="kv_len (= cache size)")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sweep", action="store_true", help="also time a few other T / B sizes")
    p.add_argument("--splits", type=int, nargs="*", default=[], help="also time kvfx with these fixed num_splits")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA-graph replays (do_bench_cudagraph) instead of eager launches")
    p.add_argument("--warmup-ms", type=int, default=100)
    p.add_argument("--rep-ms", type=int, default=500)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_attention_<gpu>.json)")
    a = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("decode_attention benchmark: CUDA is not available; run it on a GPU machine.", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    dtype = DTYPES[a.dtype]
    cases = [(a.batch, a.seq, a.q_heads, a.kv_heads, a.head_dim)]
    if a.sweep:
        for B, T in [(1, 32768), (1, 131072), (8, 4096), (8, 8192), (32, 8192), (64, 2048), (8, 65536)]:
            c = (B, T, a.q_heads, a.kv_heads, a.head_dim)
            if c not in cases:
                cases.append(c)

    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}  torch {torch.__version__}  triton {triton.__version__}")
    results = []
    for B, T, Hq, Hkv, D in cases:
        r = bench_case(B, T, Hq, Hkv, D, dtype, splits=a.splits, warmup_ms=a.warmup_ms, rep_ms=a.rep_ms,
                       cuda_graph=a.cuda_graph)
        _print_case(r)
        results.append(r)

    payload = {
        **gpu_environment(),
        "timer": ("triton.testing.do_bench_cudagraph" if a.cuda_graph else "triton.testing.do_bench")
        + "(return_mode='median')",
        "results": results,
    }
    path = write_json(a.out or results_path(f"decode_attention_{gpu_slug(gpu)}.json"), payload)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
