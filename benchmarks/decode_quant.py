"""Quantized decode attention vs the bf16 cache: SDPA-GQA over all T tokens vs kvfx's decode kernel reading KIVI
(and GEAR) packed codes, in one run.

    python benchmarks/decode_quant.py                   # B=8 T=32768 Hq=32 Hkv=8 D=128 bf16; 4 and 2 bits
    python benchmarks/decode_quant.py --groups 32,64 --splits 0,16,32 --no-gear

The cache is the state KIVI leaves after a T-token prompt (residual 128), at the first decode step (kv_len = T + 1):
keys quantized up to T - T mod 128 (the rest, and the new token, in the bf16 residual), values up to T - 128 (the
last 128 and the new token in the residual).  Keys and values are random normal, quantized with the Triton
quantizer; GEAR (rank 2, 2% outliers) compresses the same prompt with kvfx.kernels.gear's reference (one low-rank
segment, low-rank block 128).  Timers as benchmarks/decode_eviction.py: the median of single calls with the L2
flushed, each a CUDA-graph replay (the goal's timer; autotuning, if on, runs in the warm-up before capture) and an
eager call.  KV bytes: codes + scales + offsets + residual tokens (+ GEAR's factors and outliers) as a fraction of
the bf16 cache's 2 * B * Hkv * kv_len * D * 2 bytes.  Goals (issue 5): 4 bits >= 3x and 2 bits >= 5x faster than
SDPA-GQA, KV bytes <= 0.3x / <= 0.18x of bf16.  Writes benchmarks/results/decode_quant_<gpu>.json (or under
$KVFX_RESULTS_DIR) and the same table as text beside it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_eviction import _rel_err, _time_both  # noqa: E402

from kvfx.results import gpu_environment, gpu_slug, results_path, write_json  # noqa: E402

GOALS = {4: dict(speedup=3.0, bytes=0.30), 2: dict(speedup=5.0, bytes=0.18)}
RESIDUAL = 128


def _cache(k_full, v_full, bits, group, method, rank, outliers):
    """(keys, values, k_res, v_res, k_gear, v_gear, k_quantized, v_quantized, kv_len) for a prompt of T tokens
    plus the first decode token."""
    from kvfx.kernels.gear import gear_compress_reference
    from kvfx.kernels.quant_pack import quantize

    B, H, T, D = k_full.shape
    nqk, nqv = T - T % RESIDUAL, T - RESIDUAL
    new_k, new_v = k_full[:, :, -1:], v_full[:, :, -1:]  # stands in for the decode step's new token
    k_res = torch.cat([k_full[:, :, nqk:], new_k], 2).contiguous()
    v_res = torch.cat([v_full[:, :, nqv:], new_v], 2).contiguous()
    if method == "kivi":
        keys = quantize(k_full[:, :, :nqk], "keys", bits, group)
        values = quantize(v_full[:, :, :nqv], "values", bits, group)
        k_gear = v_gear = None
    else:
        keys, k_gear = gear_compress_reference(k_full[:, :, :nqk], "keys", bits, group, rank, outliers,
                                               lr_block=RESIDUAL, use_kernel=True)
        values, v_gear = gear_compress_reference(v_full[:, :, :nqv], "values", bits, group, rank, outliers,
                                                 lr_block=RESIDUAL, use_kernel=True)
    return keys, values, k_res, v_res, k_gear, v_gear, nqk, nqv, T + 1


def _tuned_config(qda) -> str:
    cache = getattr(qda._SPLIT_TUNED, "cache", {})
    if not cache:
        return "fixed " + str(qda._FIXED_GPU_CONFIG)
    return "; ".join(sorted({str(c) for c in cache.values()}))


def bench_one(q, k_full, v_full, *, bits, group, method, rank, outliers, splits, warmup, reps, flush, check, sdpa):
    from kvfx.kernels import quant_decode_attention as qda

    keys, values, k_res, v_res, k_gear, v_gear, nqk, nqv, kv_len = _cache(k_full, v_full, bits, group, method, rank,
                                                                          outliers)
    B, Hq, D = q.shape
    scale = D**-0.5
    kw = dict(k_quantized=nqk, v_quantized=nqv, kv_len=kv_len, scale=scale, k_gear=k_gear, v_gear=v_gear)
    nbytes = qda.kv_bytes(keys, values, k_res, v_res, **{k: kw[k] for k in ("k_quantized", "v_quantized", "kv_len",
                                                                             "k_gear", "v_gear")})
    bf16_bytes = 2 * B * keys.codes.shape[1] * kv_len * D * 2
    row = dict(method=method, bits=bits, group=group, rank=rank if method == "gear" else 0,
               outliers=outliers if method == "gear" else 0.0,
               outliers_per_row={"keys": k_gear.n_out if k_gear else 0, "values": v_gear.n_out if v_gear else 0},
               k_quantized=nqk, v_quantized=nqv, kv_len=kv_len, kv_bytes=nbytes, kv_bytes_vs_bf16=nbytes / bf16_bytes)

    def kernel(ns=None):
        return qda.quant_decode_attention(q, keys, values, k_res, v_res, **kw, num_splits=ns)

    if check:  # float32 reference on the GPU (TF32 off), a few rows to bound memory
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            out = kernel()
            rows = slice(0, 2)
            sub = lambda t: None if t is None else t[rows]  # noqa: E731
            from kvfx.kernels.gear import GearTerms
            from kvfx.kernels.quant_pack import Quantized

            subq = lambda qt: Quantized(qt.codes[rows], qt.scale[rows], qt.offset[rows], qt.bits, qt.group,  # noqa
                                        qt.kind)
            subg = lambda g: None if g is None else GearTerms(sub(g.lr_a), sub(g.lr_b), g.lr_seg, g.lr_block,  # noqa
                                                             sub(g.out_idx), sub(g.out_val))
            ref = qda.quant_decode_attention_reference(
                q[rows].float(), subq(keys), subq(values), k_res[rows].float(), v_res[rows].float(),
                **{**kw, "k_gear": subg(k_gear), "v_gear": subg(v_gear)})
            row["rel_err_vs_fp32_reference"] = _rel_err(out[rows], ref)
            del out, ref
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        torch.cuda.empty_cache()

    row["ms"] = _time_both(kernel, warmup, reps, flush)
    row["speedup"] = {t: sdpa[t] / row["ms"][t] for t in row["ms"]}
    row["config"] = _tuned_config(qda)
    row["tb_per_s"] = nbytes / (row["ms"]["graph"] * 1e-3) / 1e12
    if splits:
        row["splits_ms"] = {str(ns or "default"): _time_both(lambda: kernel(ns), warmup, reps, flush)["graph"]
                            for ns in splits}
    goal = GOALS.get(bits)
    if goal:
        row["goal"] = dict(goal, met_speedup=row["speedup"]["graph"] >= goal["speedup"],
                           met_bytes=row["kv_bytes_vs_bf16"] <= goal["bytes"])
    del keys, values, k_res, v_res, k_gear, v_gear
    torch.cuda.empty_cache()
    return row


def _table(rows, sdpa, header) -> str:
    lines = [header, f"  {'path':<28}{'graph ms':>10}{'speedup':>9}{'eager ms':>10}{'KV bytes':>10}{'TB/s':>7}  goal"]
    lines.append(f"  {'sdpa_gqa (bf16 cache)':<28}{sdpa['graph']:>10.4f}{'1.00x':>9}{sdpa['eager']:>10.4f}"
                 f"{'1.000':>10}")
    for r in rows:
        name = f"{r['method']}-{r['bits']} g{r['group']}" + (f" r{r['rank']} o{r['outliers']:g}"
                                                              if r["method"] == "gear" else "")
        goal = r.get("goal")
        verdict = "" if not goal or r["method"] != "kivi" else (
            f">={goal['speedup']:g}x {'met' if goal['met_speedup'] else 'NOT met'}, <={goal['bytes']:g} bytes "
            f"{'met' if goal['met_bytes'] else 'NOT met'}")
        lines.append(f"  {name:<28}{r['ms']['graph']:>10.4f}{r['speedup']['graph']:>8.2f}x{r['ms']['eager']:>10.4f}"
                     f"{r['kv_bytes_vs_bf16']:>10.3f}{r['tb_per_s']:>7.2f}  {verdict}")
        if "splits_ms" in r:
            lines.append("      splits: " + "  ".join(f"{ns}: {ms:.4f} ms" for ns, ms in r["splits_ms"].items()))
        if "rel_err_vs_fp32_reference" in r:
            lines.append(f"      max rel err vs fp32 reference {r['rel_err_vs_fp32_reference']:.2e}; "
                         f"config {r['config']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", "-B", type=int, default=8)
    p.add_argument("--seq", "-T", type=int, default=32768, help="prompt tokens")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bits", default="4,2", help="comma-separated bit widths (2, 4, 8)")
    p.add_argument("--groups", default="32,64", help="comma-separated group sizes")
    p.add_argument("--gear-group", type=int, default=64)
    p.add_argument("--no-gear", action="store_true")
    p.add_argument("--splits", default="", help="comma-separated split counts to time as well (0: the default)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--no-flush", action="store_true", help="do not flush the L2 cache before each timed call")
    p.add_argument("--no-check", action="store_true", help="skip the float32 reference check")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_quant_<gpu>.json)")
    a = p.parse_args(argv)
    try:
        bit_list = [int(x) for x in a.bits.split(",") if x.strip()]
        groups = [int(x) for x in a.groups.split(",") if x.strip()]
        splits = [int(x) or None for x in a.splits.split(",") if x.strip()]
    except ValueError:
        p.error("--bits, --groups and --splits take comma-separated ints")
    if not torch.cuda.is_available():
        print("decode_quant: CUDA is not available; run it on a GPU machine.", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)

    B, T, Hq, Hkv, D = a.batch, a.seq, a.q_heads, a.kv_heads, a.head_dim
    dev, dtype = torch.device("cuda"), torch.bfloat16
    gpu = torch.cuda.get_device_name(0)
    torch.manual_seed(0)
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    k_full = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype)
    v_full = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype)
    flush = None if a.no_flush else torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=dev)
    def sdpa_call():
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_full, v_full, enable_gqa=True)

    sdpa = _time_both(sdpa_call, a.warmup, a.reps, flush)
    header = f"GPU {gpu}; B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} bf16, residual {RESIDUAL}, kv_len {T + 1}"
    print(header)
    print(f"  sdpa_gqa over the bf16 cache: graph {sdpa['graph']:.4f} ms, eager {sdpa['eager']:.4f} ms")

    runs = [dict(method="kivi", bits=b, group=g, rank=0, outliers=0.0) for b in bit_list for g in groups]
    if not a.no_gear:
        runs += [dict(method="gear", bits=b, group=a.gear_group, rank=2, outliers=0.02) for b in bit_list if b < 8]
    rows = []
    for r in runs:
        row = bench_one(q, k_full, v_full, **r, splits=splits, warmup=a.warmup, reps=a.reps, flush=flush,
                        check=not a.no_check, sdpa=sdpa)
        rows.append(row)
        print(_table([row], sdpa, "").split("\n", 3)[-1], flush=True)
    table = _table(rows, sdpa, header)
    print("\n" + table)
    payload = {
        **gpu_environment(),
        "shape": dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype="bf16", residual=RESIDUAL, kv_len=T + 1),
        "timer": f"CUDA events, median of {a.reps} single calls after {a.warmup} warm-up calls"
        + ("" if a.no_flush else ", L2 flushed (256 MB memset) before each call")
        + "; graph: one replay of the call captured in a CUDA graph; eager: the call launched from Python",
        "quant_asm": os.environ.get("KVFX_QUANT_ASM", "1"),
        "sdpa_gqa_full_ms": sdpa,
        "bf16_cache_bytes": 2 * B * Hkv * (T + 1) * D * 2,
        "goals": {str(b): g for b, g in GOALS.items()},
        "results": rows,
    }
    path = write_json(a.out or results_path(f"decode_quant_{gpu_slug(gpu)}.json"), payload)
    path.with_suffix(".txt").write_text(table + "\n")
    print(f"\nwrote {path} and {path.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
