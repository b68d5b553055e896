"""GPU tests of the fused decode-attention kernel (compiled Triton on CUDA).

This module deliberately does NOT set TRITON_INTERPRET (CUDA tensors always take the
compiled kernels anyway).  Run on the GPU machine with ``pytest -m gpu``.

The ground truth is ``decode_attention_reference`` evaluated on the CPU on the exactly
upcast fp32 inputs (no TF32, no output rounding).  Tolerances, max |kernel - ref| <=
tol * max |ref|:
  fp32: 5e-5 -- IEEE fp32 dots; exp2 is ex2.approx (~2 ulp) and splits of up to
        thousands of keys sum in a different order than the reference.
  fp16: 2e-3 -- output rounding (2^-11 relative) plus the softmax weights rounded to
        fp16 before the P.V tensor-core product (another ~2^-11 per weight).
  bf16: 8e-3 -- the same two roundings with bf16's 8-bit significand (2^-9 each).
"""

import random

import pytest
import torch

from kvfx.kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    default_num_splits,
    supports,
    triton_interpreting,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        triton_interpreting(),
        reason="triton was imported under TRITON_INTERPRET=1 (by an earlier module); "
        "run the GPU tests in their own process: pytest -m gpu tests/test_decode_attention_gpu.py",
    ),
]

TOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _fixed_launch_config(request, monkeypatch):
    """Most tests use the fixed launch configuration: autotuning every one of their many
    specialisations would compile ~10 configs each and take many minutes on a fresh
    machine.  Tests named test_autotuned_* keep the autotuner (the default path)."""
    if not request.node.name.startswith("test_autotuned"):
        monkeypatch.setenv("KVFX_DECODE_AUTOTUNE", "0")


def _ref_cpu(q, k, v, kv_len, mask=None, **kw):
    k = k[:, :, :kv_len]
    v = v[:, :, :kv_len]
    return decode_attention_reference(
        q.float().cpu(), k.float().cpu(), v.float().cpu(), kv_len,
        mask=None if mask is None else mask.cpu(), **kw,
    )


def _check(out, ref, dtype, what=""):
    assert out.is_cuda and out.dtype == dtype
    out = out.float().cpu()
    assert torch.isfinite(out).all(), f"non-finite output {what}"
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    bound = TOL[dtype] * max(ref.abs().max().item() if ref.numel() else 0.0, 1e-6)
    assert err <= bound, f"{what}: max err {err:.3g} > {bound:.3g} ({dtype})"


def _cache(B, Hkv, cap, D, dtype, layout, dev="cuda"):
    if layout == "contiguous":
        return torch.randn(B, Hkv, cap, D, device=dev, dtype=dtype)
    if layout == "bshd":
        return torch.randn(B, cap, Hkv, D, device=dev, dtype=dtype).permute(0, 2, 1, 3)
    buf = torch.randn(B + 1, 2 * Hkv, cap + 3, D + 16, device=dev, dtype=dtype)
    return buf[1:, ::2, 2 : 2 + cap, 8 : 8 + D]


def _mask(kind, B, kv_len, dtype, dev="cuda"):
    if kind == "none":
        return None
    if kind == "bool":
        m = torch.rand(B, kv_len, device=dev) > 0.3
        m[:, -1] = True
        return m
    if kind == "float":
        pos = torch.arange(kv_len, device=dev, dtype=torch.float32)[None]
        slope = torch.rand(B, 1, device=dev)
        bias = slope * (pos - kv_len) / kv_len * 8.0
        holes = torch.rand(B, kv_len, device=dev) < 0.2
        holes[:, 0] = False
        return bias.masked_fill(holes, float("-inf")).to(dtype)
    if kind == "broadcast":
        row = torch.zeros(kv_len, device=dev, dtype=dtype)
        row[torch.rand(kv_len, device=dev) < 0.5] = float("-inf")
        row[0] = 0.0
        return row[None].expand(B, kv_len)
    raise AssertionError(kind)


def _run_case(B, Hkv, G, D, kv_len, cap, dtype, layout="contiguous", mask="none", softcap=0.0, num_splits=None):
    torch.manual_seed(B * 1000003 + Hkv * 1009 + G * 101 + D + kv_len)
    q = torch.randn(B, Hkv * G, D, device="cuda", dtype=dtype)
    k = _cache(B, Hkv, cap, D, dtype, layout)
    v = _cache(B, Hkv, cap, D, dtype, layout)
    if cap > kv_len:  # spare capacity must never be read
        k[:, :, kv_len:] = float("nan")
        v[:, :, kv_len:] = float("nan")
    m = _mask(mask, B, kv_len, dtype)
    assert supports(q, k) is None
    out = decode_attention(q, k, v, kv_len, mask=m, softcap=softcap, num_splits=num_splits)
    ref = _ref_cpu(q, k, v, kv_len, mask=m, softcap=softcap)
    _check(out, ref, dtype, what=f"B={B} Hkv={Hkv} G={G} D={D} T={kv_len} {layout} {mask} cap={softcap} s={num_splits}")


FIXED = [
    # B, Hkv, G, D, kv_len, cap
    (8, 8, 4, 128, 33000, 33024),  # the benchmark class, long
    (2, 8, 4, 128, 5000, 5120),
    (1, 2, 8, 64, 5000, 5003),
    (4, 4, 1, 128, 777, 800),  # MHA
    (2, 1, 8, 64, 33000, 33000),  # MQA-ish, long, exact capacity
    (3, 2, 4, 256, 2049, 2100),
    (2, 2, 2, 16, 1, 4),
    (1, 8, 4, 32, 300, 301),
    (64, 8, 4, 128, 130, 256),  # big batch, short cache
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FIXED, ids=lambda s: "x".join(map(str, s)))
def test_fixed_shapes(shape, dtype):
    _run_case(*shape, dtype)


MASK_CASES = [
    (torch.bfloat16, "bool", 0.0),
    (torch.bfloat16, "float", 0.0),
    (torch.bfloat16, "broadcast", 0.0),
    (torch.bfloat16, "bool", 50.0),
    (torch.bfloat16, "float", 50.0),
    (torch.float16, "float", 50.0),
    (torch.float16, "bool", 0.0),
    (torch.float32, "float", 50.0),
    (torch.float32, "broadcast", 0.0),
]


@pytest.mark.parametrize("dtype,mask,softcap", MASK_CASES, ids=str)
def test_masks_long(dtype, mask, softcap):
    _run_case(2, 4, 4, 128, 33000, 33100, dtype, layout="bshd", mask=mask, softcap=softcap)


@pytest.mark.parametrize("seed", range(20))
def test_random_shapes(seed):
    rng = random.Random(seed)
    B = rng.randint(1, 6)
    Hkv = rng.choice([1, 2, 4, 8])
    G = rng.choice([1, 2, 4, 8])
    D = rng.choice([16, 32, 64, 64, 128, 128, 256])
    kv_len = rng.choice([1, 17, 63, 64, 65, 1000, 4097, rng.randint(1, 20000)])
    cap = kv_len + rng.choice([0, 1, 100])
    _run_case(
        B, Hkv, G, D, kv_len, cap,
        dtype=rng.choice(DTYPES),
        layout=rng.choice(["contiguous", "bshd", "sliced"]),
        mask=rng.choice(["none", "bool", "float", "broadcast"]),
        softcap=rng.choice([0.0, 0.0, 30.0]),
        num_splits=rng.choice([None, None, 1, 3, 16]),
    )


@pytest.mark.parametrize("num_splits", [1, 4, 37])
def test_all_masked_rows_are_zero(num_splits):
    B, Hkv, G, D, kv_len = 3, 2, 4, 128, 4000
    q = torch.randn(B, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, kv_len, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    keep = torch.zeros(B, kv_len, dtype=torch.bool, device="cuda")
    keep[0] = True
    keep[2, -1] = True  # only the last key: every other split is fully masked
    for mask in (keep, torch.zeros(B, kv_len, device="cuda").masked_fill(~keep, float("-inf"))):
        out = decode_attention(q, k, v, kv_len, mask=mask, num_splits=num_splits)
        assert torch.isfinite(out.float()).all()
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out[2].view(Hkv, G, D), v[2, :, -1][:, None].expand(Hkv, G, D))
        _check(out, _ref_cpu(q, k, v, kv_len, mask=mask), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autotuned_benchmark_class(dtype):
    """The default (autotuned) path on the benchmark's shape class, one and many splits."""
    _run_case(8, 8, 4, 128, 32768, 32768, dtype)
    _run_case(8, 8, 4, 128, 300, 512, dtype, mask="bool")
    _run_case(2, 2, 4, 256, 3000, 3000, dtype)


def test_autotuned_growing_kv_len_decode_loop():
    """A decode loop over a preallocated cache: every step is correct (tuning is cached)."""
    B, Hkv, G, D, cap = 2, 4, 4, 128, 3000
    k = torch.randn(B, Hkv, cap, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for kv_len in (1, 2, 63, 64, 65, 511, 512, 513, 1024, 2999, 3000):
        q = torch.randn(B, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
        _check(decode_attention(q, k, v, kv_len), _ref_cpu(q, k, v, kv_len), torch.bfloat16, what=str(kv_len))


def test_autotuned_cuda_graph_capture():
    """After one eager call (compiles/tunes), the kernel can be captured in a CUDA graph."""
    B, Hkv, G, D, kv_len = 4, 8, 4, 128, 8192
    q = torch.randn(B, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, kv_len, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    eager = decode_attention(q, k, v, kv_len)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        decode_attention(q, k, v, kv_len)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, k, v, kv_len)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    _check(out, _ref_cpu(q, k, v, kv_len), torch.bfloat16)
    assert not torch.equal(out, eager)


def test_matches_sdpa_enable_gqa():
    B, Hkv, G, D, T = 4, 8, 4, 128, 4096
    q = torch.randn(B, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    out = decode_attention(q, k, v, T)
    err = (out.float() - sdpa.float()).abs().max().item()
    assert err <= 1.6e-2 * sdpa.float().abs().max().item()  # both sides round to bf16


def test_supports_cuda():
    q = torch.randn(1, 4, 64, device="cuda")
    assert supports(q, torch.randn(1, 2, 8, 64, device="cuda")) is None
    assert "head_dim 8" in supports(torch.randn(1, 4, 8, device="cuda"), torch.randn(1, 2, 8, 8, device="cuda"))
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    assert default_num_splits(8, 8, 32768, sm) > 1
