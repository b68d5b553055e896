"""Probe: would Hopper's tensor-memory-accelerator loads (Triton tensor descriptors) or streaming cache hints make
the split-K decode kernel read a slot store faster?

Three stripped-down split kernels (no mask, no softcap; GQA group of G heads per program, exp2 online softmax, the
production combine kernel) over the same ``[B, Hkv, S, D]`` store, each timed as CUDA-graph replays after an L2
flush, beside the production ``decode_attention`` and SDPA-GQA over a dense cache of the same size:

* ``ptr``: pointer loads, as the production kernel.
* ``ptr-ef``: pointer loads with ``eviction_policy="evict_first"`` (streamed K/V should not displace other lines).
* ``tma``: K and V through host-side tensor descriptors ``[B * Hkv, S, D]``, block ``[1, BLOCK_N, D]`` (TMA copies
  into shared memory; out-of-range rows are zero-filled by the copy engine).

Every variant's output is checked against the float32 reference before it is timed.

    python benchmarks/decode_tma_probe.py --budget 0.2
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_eviction import _time_ms, l2_flush  # noqa: E402


@triton.jit
def _probe_split_kernel(Q, K, V, Kd, Vd, Opart, Lse, stride_kb, stride_kh, stride_kn, S, num_splits, Hkv, qk_scale,
                        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                        MODE: tl.constexpr):  # 0 ptr, 1 ptr evict_first, 2 tma
    pid = tl.program_id(0)
    split = pid % num_splits
    bh = pid // num_splits
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    hq = hk * GROUP + offs_g
    g_valid = offs_g < GROUP
    q = tl.load(Q + (b * Hkv * GROUP + hq)[:, None] * HEAD_DIM + offs_d[None, :], mask=g_valid[:, None], other=0.0)
    chunk = ((S + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, S)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_kb + hk * stride_kh
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for it in range(0, (tl.maximum(end - start, 0) + BLOCK_N - 1) // BLOCK_N):
        col = start + it * BLOCK_N
        cols = col + offs_n
        if MODE == 2:
            k = Kd.load([bh, col, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = Vd.load([bh, col, 0]).reshape(BLOCK_N, HEAD_DIM)
        elif MODE == 1:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < end)[:, None], other=0.0,
                        eviction_policy="evict_first")
            v = tl.load(v_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < end)[:, None], other=0.0,
                        eviction_policy="evict_first")
        else:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < end)[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < end)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where((cols < end)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    row = (b * (Hkv * GROUP) + hq) * num_splits + split
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(Opart + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=g_valid[:, None])
    tl.store(Lse + row, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=g_valid)


def probe(q, k, v, mode: int, block_n: int, warps: int, stages: int, splits: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    from kvfx.kernels.decode_attention import combine_partials

    B, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    opart = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    kd = TensorDescriptor(k, [B * Hkv, S, D], [k.stride(1), k.stride(2), 1], [1, block_n, D])
    vd = TensorDescriptor(v, [B * Hkv, S, D], [v.stride(1), v.stride(2), 1], [1, block_n, D])
    qk_scale = D**-0.5 * 1.4426950408889634

    def run():
        _probe_split_kernel[(B * Hkv * splits,)](
            q, k, v, kd, vd, opart, lse, k.stride(0), k.stride(1), k.stride(2), S, splits, Hkv, qk_scale,
            GROUP=G, BLOCK_G=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, BLOCK_N=block_n, MODE=mode,
            num_warps=warps, num_stages=stages)
        combine_partials(opart, lse, out, interpret=q.device.type != "cuda")
        return out

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--splits", default="6,8,12,16")
    p.add_argument("--flush", default="read")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)
    from kvfx.kernels.decode_attention import decode_attention, decode_attention_reference

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    B, Hq, Hkv, D = 8, 32, 8, 128
    S = round(a.budget * a.seq) + 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = decode_attention_reference(q.float(), k.float(), v.float(), S).float()
    nbytes = 2 * k.numel() * k.element_size()
    for flush_mode in a.flush.split(","):
        flush = l2_flush(flush_mode, "cuda")

        def report(name, ms):
            print(f"{flush_mode:<7}{name:<44}{ms * 1e3:8.1f} us {nbytes / (ms * 1e-3) / 1e12:6.2f} TB/s", flush=True)

        report("sdpa_gqa dense, same size", _time_ms(
            lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True), 5, a.reps, flush,
            graph=True))
        report("production decode_attention (autotuned)",
               _time_ms(lambda: decode_attention(q, k, v, S), 5, a.reps, flush, graph=True))
        for mode, name in ((0, "ptr"), (1, "ptr-ef"), (2, "tma")):
            for block_n, warps, stages in ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3),
                                           (128, 8, 3), (64, 8, 4)):
                for splits in (int(x) for x in a.splits.split(",")):
                    tag = f"{name} n{block_n} w{warps} s{stages} splits {splits}"
                    try:
                        run = probe(q, k, v, mode, block_n, warps, stages, splits)
                        err = (run().float() - ref).abs().max().item()
                        if err > 2e-2:
                            print(f"{flush_mode:<7}{tag:<44} WRONG: max abs err {err:.3g}", flush=True)
                            continue
                        report(tag, _time_ms(run, 3, a.reps, flush, graph=True))
                    except Exception as exc:  # a config the compiler rejects (shared memory) is reported, not fatal
                        print(f"{flush_mode:<7}{tag:<44} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)


if __name__ == "__main__":
    main()
