"""Decode step with an eviction cache vs the full cache: SDPA-GQA over all T tokens vs kvfx over a slot store of
``budget * T`` slots (+1 for the incoming token).

    python benchmarks/decode_eviction.py                         # B=8 T=32768 Hq=32 Hkv=8 D=128 bf16, budget 0.2
    python benchmarks/decode_eviction.py --budgets 0.1,0.2,0.3,0.5

Paths timed per budget:
  sdpa_gqa_full        F.scaled_dot_product_attention(q [B, Hq, 1, D], k, v [B, Hkv, T, D], enable_gqa=True)
  sdpa_gqa_store_size  SDPA-GQA over a dense cache of the store's size: what its bytes cost a library kernel
  kvfx_decode_store    kvfx decode_attention over the store (no scores, no eviction): the attention alone
  kvfx_scored          scored_decode_attention over the store (attention + H2O scores)
  kvfx_step_<policy>   the whole per-layer decode step kvfx runs (EvictingLayerCache.decode: write the new token
                       into the free slot, attend with the slots' mask read at their positions, add the scores,
                       evict one slot) for window, h2o and keyformer (Gumbel scores)
Two timers, each the median of single calls with the L2 cache flushed before each call (CUDA events), once per
flush mode (``--flush``, default ``read,memset``; see :func:`l2_flush`), each mode with its own SDPA baseline:
  graph   the call captured once in a CUDA graph and replayed: the GPU time of the step (launch gaps shrunk; what
          CUDA graphs / mode="reduce-overhead" would see). The goal is stated on this timer, for every path alike.
  eager   the call launched from Python each time: adds host overhead (argument checks, Triton's launcher).
Writes benchmarks/results/decode_eviction_<gpu-name-slug>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

from kvfx.results import gpu_environment, gpu_slug, results_path, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


FLUSHES = ("read", "memset", "none")


def l2_flush(mode: str, device) -> Callable[[], object] | None:
    """What runs before each timed call so that it starts with nothing of its operands in the L2 cache.

    ``read``: read a 256 MB buffer (5x the H100's 50 MB L2), which leaves the L2 full of clean lines, as a decode
    step finds it after the previous layer's weights were read. ``memset``: write zeros over that buffer, which leaves
    the L2 full of dirty lines that the timed call then writes back to memory as it evicts them (up to ~50 MB of extra
    traffic inside the timed region, the same for every path). ``none``: no flush."""
    if mode == "none":
        return None
    buf = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    if mode == "memset":
        return buf.zero_
    if mode == "read":
        return buf.amax
    raise ValueError(f"flush mode {mode!r}: expected one of {FLUSHES}")


def add_flush_option(parser: argparse.ArgumentParser) -> None:
    """``--flush``: comma-separated L2 flush modes, each timed with its own baseline (default: read and memset)."""
    parser.add_argument("--flush", default="read,memset",
                        help=f"comma-separated L2 flush modes, each timed with its own baseline ({', '.join(FLUSHES)}; "
                             "see decode_eviction.l2_flush)")


def flush_modes(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The modes of a ``--flush`` value (``parser.error`` on an unknown one)."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in FLUSHES for m in modes):
        parser.error(f"--flush must be comma-separated modes of {FLUSHES}, got {text!r}")
    return modes


def _time_ms(fn, warmup: int, reps: int, flush, graph: bool = False) -> float:
    """Median CUDA-event time of one call (``graph``: of one replay of the call captured in a CUDA graph).
    ``flush`` runs before each timed call: a callable (:func:`l2_flush`), a tensor (zeroed: the memset flush) or
    None."""
    if isinstance(flush, torch.Tensor):
        flush = flush.zero_
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    call = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        call = captured.replay
        for _ in range(3):
            call()
        torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None:
            flush()
        starts[i].record()
        call()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _time_both(fn, warmup, reps, flush) -> dict:
    return {"graph": _time_ms(fn, warmup, reps, flush, graph=True), "eager": _time_ms(fn, warmup, reps, flush)}


def _rel_err(got, ref) -> float:
    return (got.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-30)


def bench_budget(q, k_full, v_full, budget: float, *, warmup: int, reps: int, flush, check: bool) -> dict:
    from kvfx.kernels.decode_attention import decode_attention
    from kvfx.kernels.scored_decode_attention import (
        GumbelScores,
        scored_decode_attention,
        scored_decode_attention_reference,
    )

    B, Hq, D = q.shape
    Hkv, T = k_full.shape[1], k_full.shape[2]
    S = round(budget * T) + 1
    dev = q.device
    gen = torch.Generator(device=dev).manual_seed(1)
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=q.dtype, generator=gen)
    v = torch.randn(B, Hkv, S, D, device=dev, dtype=q.dtype, generator=gen)
    bias = torch.zeros(B, 1, S, device=dev)
    bias[torch.rand(B, 1, S, device=dev, generator=gen) < 0.01] = float("-inf")  # a few empty slots
    bias[:, :, -1] = 0.0  # the incoming token's slot
    mask = bias[:, 0]  # the same bias for decode_attention ([B, kv_len] additive)
    gumbel = GumbelScores(seed=1234, layer=0, tau=1.0)
    qpos = torch.full((B,), T, device=dev, dtype=torch.int64)
    kpos = torch.randint(0, T, (B, Hkv, S), device=dev, dtype=torch.int64, generator=gen)
    scale = D**-0.5
    store_bytes = 2 * k.numel() * k.element_size()

    def scored():
        return scored_decode_attention(q, k, v, bias, scale=scale)

    def scored_gumbel():
        return scored_decode_attention(q, k, v, bias, scale=scale, gumbel=gumbel, qpos=qpos, kpos=kpos)

    t0 = time.time()
    scored()
    scored_gumbel()
    torch.cuda.synchronize()
    first_call_s = time.time() - t0

    errors = {}
    if check:  # float32 reference on the GPU, TF32 off
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            for name, kw in (("plain", {}), ("gumbel", dict(gumbel=gumbel, qpos=qpos, kpos=kpos))):
                out, score = scored_decode_attention(q, k, v, bias, scale=scale, **kw)
                ref_out, ref_score = scored_decode_attention_reference(q.float(), k.float(), v.float(), bias,
                                                                       scale=scale, **kw)
                errors[f"{name}_out_rel"] = _rel_err(out, ref_out)
                errors[f"{name}_score_rel"] = _rel_err(score, ref_score)
                del ref_out, ref_score
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        torch.cuda.empty_cache()

    dense_k, dense_v = k[:, :, : S - 1], v[:, :, : S - 1]
    ms = {
        # what the same bytes cost without eviction: SDPA-GQA over a dense cache of the store's size
        "sdpa_gqa_store_size": _time_both(
            lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], dense_k, dense_v,
                                                                     enable_gqa=True), warmup, reps, flush),
        "kvfx_decode_store": _time_both(lambda: decode_attention(q, k, v, S, mask=mask, scale=scale), warmup, reps,
                                        flush),
        "kvfx_scored": _time_both(scored, warmup, reps, flush),
    }
    for method in ("window", "h2o", "keyformer"):
        cache = _filled_cache(method, k, v, T)
        k_new, v_new = k[:, :, :1].clone(), v[:, :, :1].clone()
        ms[f"kvfx_step_{method}"] = _time_both(
            lambda: cache.decode(q[:, :, None], k_new, v_new, None, scale=scale, softcap=0.0), warmup, reps, flush)
        del cache
    del k, v
    torch.cuda.empty_cache()
    return dict(budget=budget, slots=S, store_bytes=store_bytes, ms=ms, first_call_s=first_call_s, rel_err=errors,
                store_tb_per_s={n: store_bytes / (t["graph"] * 1e-3) / 1e12 for n, t in ms.items()})


def _filled_cache(method: str, k, v, prompt: int):
    """An EvictingLayerCache in the state a ``prompt``-token prefill would leave: every slot but the spare live."""
    from kvfx.eviction import make_policy
    from kvfx.eviction.slot_cache import EvictingLayerCache
    from kvfx.spec import EvictH2O, EvictKeyformer, EvictWindow

    budget = k.shape[2] - 1
    config = EvictWindow(budget=budget) if method == "window" else \
        {"h2o": EvictH2O, "keyformer": EvictKeyformer}[method](budget=budget, recent=0.5)
    B, H, S, _ = k.shape
    cache = EvictingLayerCache(0, [make_policy(config)] * H)
    cache.k, cache.v = k.clone(), v.clone()
    positions = torch.randperm(prompt, device=k.device)[: S - 1].sort().values
    cache.pos = torch.cat([positions, positions.new_full((1,), -1)]).expand(B, H, S).clone()  # the last: the spare
    cache.score = torch.rand(B, H, S, device=k.device)
    cache.live = torch.full((B, H), S - 1, device=k.device, dtype=torch.long)
    cache.budget = torch.full((B, H), S - 1, device=k.device, dtype=torch.long)
    cache.recent = cache.budget // 2
    cache.first_valid = torch.zeros(B, device=k.device, dtype=torch.long)
    cache.free = torch.full((B, H), S - 1, device=k.device, dtype=torch.long)
    cache.qpos = torch.zeros(B, device=k.device, dtype=torch.long)
    cache.seen = cache.prompt_end = prompt
    return cache


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", "-B", type=int, default=8)
    p.add_argument("--seq", "-T", type=int, default=32768, help="tokens in the full cache")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--budgets", default="0.2",
                   help="comma-separated store sizes as fractions of T, e.g. 0.1,0.2,0.3,0.5")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--reps", type=int, default=200)
    add_flush_option(p)
    p.add_argument("--no-check", action="store_true", help="skip the float32 reference check")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_eviction_<gpu>.json)")
    a = p.parse_args(argv)

    try:
        budgets = [float(x) for x in a.budgets.split(",") if x.strip()]
    except ValueError:
        p.error(f"--budgets must be comma-separated numbers, got {a.budgets!r}")
    if not budgets or not all(0.0 < b <= 1.0 for b in budgets):
        p.error(f"--budgets must be fractions in (0, 1], got {a.budgets!r}")
    modes = flush_modes(p, a.flush)
    if not torch.cuda.is_available():
        print("decode_eviction benchmark: CUDA is not available; run it on a GPU machine.", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    dtype = DTYPES[a.dtype]
    B, T, Hq, Hkv, D = a.batch, a.seq, a.q_heads, a.kv_heads, a.head_dim
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}  torch {torch.__version__}  triton {triton.__version__}")
    torch.manual_seed(0)
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    k_full = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype)
    v_full = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype)
    full_bytes = 2 * k_full.numel() * k_full.element_size()

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_full, v_full, enable_gqa=True)

    by_flush = {}
    for mode in modes:
        flush = l2_flush(mode, dev)
        sdpa_ms = _time_both(sdpa, a.warmup, a.reps, flush)
        print(f"\nL2 flush: {mode}\nB={B} T={T} Hq={Hq} Hkv={Hkv} D={D} {a.dtype}: "
              f"full cache {full_bytes / 1e9:.3f} GB")
        print(f"  {'':<22}{'graph ms':>10}{'TB/s':>8}{'speedup':>9}   {'eager ms':>10}{'speedup':>9}")
        print(f"  {'sdpa_gqa_full':<22}{sdpa_ms['graph']:>10.4f}"
              f"{full_bytes / (sdpa_ms['graph'] * 1e-3) / 1e12:>8.2f}{'':>9}   {sdpa_ms['eager']:>10.4f}")
        results = []
        for budget in budgets:
            r = bench_budget(q, k_full, v_full, budget, warmup=a.warmup, reps=a.reps, flush=flush,
                             check=not a.no_check and mode == modes[0])
            r["speedup_vs_sdpa_gqa_full"] = {n: {timer: sdpa_ms[timer] / t[timer] for timer in t}
                                             for n, t in r["ms"].items()}
            results.append(r)
            print(f"\n  budget {budget:g}: {r['slots']} slots, store {r['store_bytes'] / 1e9:.3f} GB, "
                  f"first calls {r['first_call_s']:.1f} s")
            if r["rel_err"]:
                print("  max rel err vs fp32 reference: " + "  ".join(f"{n} {e:.2e}" for n, e in r["rel_err"].items()))
            for n, t in r["ms"].items():
                up = r["speedup_vs_sdpa_gqa_full"][n]
                print(f"  {n:<22}{t['graph']:>10.4f}{r['store_tb_per_s'][n]:>8.2f}{up['graph']:>8.2f}x   "
                      f"{t['eager']:>10.4f}{up['eager']:>8.2f}x")
        by_flush[mode] = {"sdpa_gqa_full_ms": sdpa_ms, "results": results}
        del flush
        torch.cuda.empty_cache()

    payload = {
        **gpu_environment(),
        "shape": dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype=a.dtype),
        "timer": f"CUDA events, median of {a.reps} single calls after {a.warmup} warm-up calls, the L2 flushed before "
        "each call per flush mode (read: a 256 MB buffer read, leaving clean lines; memset: that buffer zeroed, "
        "leaving dirty lines; none); graph: one replay of the call captured in a CUDA graph; eager: the call "
        "launched from Python",
        "full_cache_bytes": full_bytes,
        "flushes": by_flush,
    }
    path = write_json(a.out or results_path(f"decode_eviction_{gpu_slug(gpu)}.json"), payload)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
