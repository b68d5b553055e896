"""GPU tests of the eviction-score kernels (compiled Triton on CUDA): scored decode attention and prefill column
scores.  Like tests/test_decode_attention_gpu.py this module does not set TRITON_INTERPRET; run it on the GPU
machine with ``pytest -m gpu tests/test_eviction_kernels_gpu.py``.

The ground truth is the torch reference evaluated on the GPU in float32 (TF32 off) on the exactly upcast inputs.
Tolerances, max |kernel - ref| <= tol * max |ref|:
  out (scored decode): fp32 5e-5, fp16 2e-3, bf16 8e-3 -- as decode_attention's GPU tests (same computation:
      output rounding plus the softmax weights rounded to the dtype before the P.V tensor-core product).
  scores (both kernels), relative to max(max |ref|, 1): 1e-4 whatever the dtype -- float32 results from logits whose
      products are exact in the fp32 accumulator (bf16/fp16 inputs) or IEEE fp32 (fp32 inputs); what differs is
      summation order over up to thousands of keys/rows, ex2.approx (~2^-22 relative) and libdevice's logf in the
      Gumbel noise.
"""

import pytest
import torch

from kvfx.kernels.attention_scores import attention_column_scores, attention_column_scores_reference
from kvfx.kernels.attention_scores import supports as scores_supports
from kvfx.kernels.decode_attention import triton_interpreting
from kvfx.kernels.scored_decode_attention import (
    GumbelScores,
    scored_decode_attention,
    scored_decode_attention_reference,
)
from kvfx.kernels.scored_decode_attention import supports as scored_supports

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        triton_interpreting(),
        reason="triton was imported under TRITON_INTERPRET=1 (by an earlier module); "
        "run the GPU tests in their own process: pytest -m gpu tests/test_eviction_kernels_gpu.py",
    ),
]

OUT_TOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
SCORE_TOL = 1e-4
DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _setup(request, monkeypatch):
    """Fixed launch configurations except in test_autotuned_* (tuning every specialisation takes minutes), and an
    fp32 reference without TF32."""
    if not request.node.name.startswith("test_autotuned"):
        monkeypatch.setenv("KVFX_DECODE_AUTOTUNE", "0")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def _close(got, ref, tol, what, floor=1e-6):
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), f"non-finite result {what}"
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    bound = tol * max(ref.abs().max().item() if ref.numel() else 0.0, floor)
    assert err <= bound, f"{what}: max err {err:.3g} > {bound:.3g}"


# ----------------------------------------------------------------------------- scored decode attention


def _scored_case(B, Hkv, G, D, S, dtype, *, gumbel=False, bias_heads=1, softcap=0.0, num_splits=None, sliced=True,
                 holes=0.05, seed=0):
    torch.manual_seed(seed)
    dev = DEV
    Hq = Hkv * G
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    if sliced:  # a view into a bigger slot store, as the cache hands it over
        store = torch.randn(2, B, Hkv, S + 64, D, device=dev, dtype=dtype)
        k, v = store[0, :, :, 32 : 32 + S], store[1, :, :, 32 : 32 + S]
    else:
        k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
        v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
    Hb = {1: 1, "kv": Hkv, "q": Hq}[bias_heads]
    bias = torch.randn(B, Hb, S, device=dev) * 0.5
    bias[torch.rand(B, Hb, S, device=dev) < holes] = float("-inf")
    bias[:, :, -1] = 0.0  # every row keeps a slot
    kw = dict(scale=D**-0.5, softcap=softcap)
    if gumbel:
        kw.update(gumbel=GumbelScores(seed=1234 + seed, layer=7, tau=0.5),
                  qpos=torch.full((B,), 40000, device=dev, dtype=torch.int64),
                  kpos=torch.randint(0, 40000, (B, Hkv, S), device=dev, dtype=torch.int32))
    assert scored_supports(q, k, v) is None
    out, score = scored_decode_attention(q, k, v, bias, num_splits=num_splits, **kw)
    ref_out, ref_score = scored_decode_attention_reference(q.float(), k.float(), v.float(), bias, **kw)
    what = f"B={B} Hkv={Hkv} G={G} D={D} S={S} {dtype} gumbel={gumbel} bias={bias_heads} cap={softcap} s={num_splits}"
    assert out.dtype == dtype and score.dtype == torch.float32 and score.shape == (B, Hkv, S)
    _close(out, ref_out, OUT_TOL[dtype], "out " + what)
    _close(score, ref_score, SCORE_TOL, "score " + what, floor=1.0)
    torch.testing.assert_close(score.sum(-1), torch.full((B, Hkv), float(G), device=dev), rtol=1e-4, atol=1e-4)


SCORED = [
    # B, Hkv, G, D, S
    (8, 8, 4, 128, 6555),  # the benchmark's shape: 20% of a 32768-token cache, plus one slot
    (4, 8, 4, 64, 6555),
    (2, 2, 8, 128, 20000),
    (3, 1, 8, 64, 777),  # MQA
    (2, 4, 1, 128, 1000),  # MHA
    (2, 2, 4, 256, 3000),
    (1, 2, 2, 16, 1),
]


@pytest.mark.parametrize("gumbel", [False, True], ids=["plain", "gumbel"])
@pytest.mark.parametrize("shape", SCORED, ids=lambda s: "x".join(map(str, s)))
def test_scored_shapes(shape, gumbel):
    _scored_case(*shape, torch.bfloat16, gumbel=gumbel)


@pytest.mark.parametrize("gumbel", [False, True], ids=["plain", "gumbel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SCORED[:2] + SCORED[-2:], ids=lambda s: "x".join(map(str, s)))
def test_scored_dtypes(shape, dtype, gumbel):
    _scored_case(*shape, dtype, gumbel=gumbel)


@pytest.mark.parametrize("num_splits", [1, 37, 128])
@pytest.mark.parametrize("bias_heads", [1, "kv", "q"])
def test_scored_splits_and_bias_layouts(num_splits, bias_heads):
    _scored_case(2, 4, 4, 128, 6555, torch.bfloat16, gumbel=True, bias_heads=bias_heads, num_splits=num_splits,
                 holes=0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scored_softcap_and_mostly_empty_store(dtype):
    _scored_case(2, 8, 4, 128, 6555, dtype, softcap=30.0, holes=0.97, num_splits=16, sliced=False)


def test_scored_bias_expanded_over_heads_and_batch():
    torch.manual_seed(1)
    B, Hkv, G, D, S = 4, 8, 4, 128, 2049
    q = torch.randn(B, Hkv * G, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    row = torch.zeros(1, 1, S, device=DEV)
    row[..., ::7] = float("-inf")
    for bias in (row.expand(B, 1, S), row.expand(B, Hkv * G, S)):
        out, score = scored_decode_attention(q, k, v, bias, scale=D**-0.5)
        ref_out, ref_score = scored_decode_attention_reference(q.float(), k.float(), v.float(), bias, scale=D**-0.5)
        _close(out, ref_out, OUT_TOL[torch.bfloat16], "out")
        _close(score, ref_score, SCORE_TOL, "score", floor=1.0)
        assert torch.equal(score[..., ::7], torch.zeros_like(score[..., ::7]))


@pytest.mark.parametrize("gumbel", [False, True], ids=["plain", "gumbel"])
def test_autotuned_scored_benchmark_class(gumbel):
    _scored_case(8, 8, 4, 128, 6555, torch.bfloat16, gumbel=gumbel)
    _scored_case(2, 8, 4, 128, 300, torch.bfloat16, gumbel=gumbel)


def test_autotuned_scored_cuda_graph_capture():
    """After one eager call (compiles/tunes), the kernels can be captured in a CUDA graph."""
    torch.manual_seed(2)
    B, Hkv, G, D, S = 4, 8, 4, 128, 4096
    q = torch.randn(B, Hkv * G, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bias = torch.zeros(B, 1, S, device=DEV)
    kw = dict(scale=D**-0.5, gumbel=GumbelScores(3, 1, 1.0), qpos=torch.full((B,), S, device=DEV),
              kpos=torch.arange(S, device=DEV).expand(B, Hkv, S))
    scored_decode_attention(q, k, v, bias, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        scored_decode_attention(q, k, v, bias, **kw)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, score = scored_decode_attention(q, k, v, bias, **kw)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    ref_out, ref_score = scored_decode_attention_reference(q.float(), k.float(), v.float(), bias, **kw)
    _close(out, ref_out, OUT_TOL[torch.bfloat16], "out")
    _close(score, ref_score, SCORE_TOL, "score", floor=1.0)


# ----------------------------------------------------------------------------- prefill column scores


def _scores_case(B, Hkv, G, D, Tq, Tk, dtype, *, causal=True, mask=None, valid=None, softcap=0.0, gumbel=False,
                 seed=0):
    torch.manual_seed(seed)
    dev = DEV
    Hq = Hkv * G
    q = torch.randn(B, Tq, Hq, D, device=dev, dtype=dtype).transpose(1, 2)  # [B, H, T, D] views of [B, T, H, D]
    k = torch.randn(B, Tk, Hkv, D, device=dev, dtype=dtype).transpose(1, 2)
    m = None
    if mask == "bool":  # transformers' [B, 1, Tq, Tk] causal-and-padding mask
        m = torch.ones(Tq, Tk, device=dev, dtype=torch.bool).tril(Tk - Tq)[None, None].repeat(B, 1, 1, 1)
        m &= torch.rand(B, 1, 1, Tk, device=dev) > 0.1
    elif mask == "float":  # per-head additive bias with -inf holes
        m = torch.randn(1, Hq, Tq, Tk, device=dev, dtype=dtype)
        m[torch.rand(1, Hq, Tq, Tk, device=dev) < 0.2] = float("-inf")
    v_ = None
    if valid == "left_pad":
        v_ = torch.ones(B, Tk, device=dev, dtype=torch.bool)
        v_[0, : Tk // 4] = False
    kw = dict(scale=D**-0.5, mask=m, causal=causal, valid=v_, softcap=softcap,
              gumbel=GumbelScores(seed=99 + seed, layer=3, tau=0.8) if gumbel else None)
    assert scores_supports(q, k) is None
    score = attention_column_scores(q, k, **kw)
    ref = attention_column_scores_reference(q.float(), k.float(), **kw)
    what = f"B={B} Hkv={Hkv} G={G} D={D} Tq={Tq} Tk={Tk} {dtype} causal={causal} mask={mask} valid={valid} g={gumbel}"
    assert score.shape == (B, Hkv, Tk) and score.dtype == torch.float32
    _close(score, ref, SCORE_TOL, what, floor=1.0)


SCORES = [
    # B, Hkv, G, D, Tq, Tk
    (1, 8, 4, 128, 4096, 4096),  # prefill
    (2, 8, 4, 128, 32, 32768),  # SnapKV's observation window over a long prompt: pass 1 splits the keys
    (2, 4, 4, 64, 1000, 1000),
    (1, 2, 7, 128, 300, 2048),  # G = 7 (not a power of two)
    (3, 2, 1, 256, 129, 700),
]


@pytest.mark.parametrize("gumbel", [False, True], ids=["plain", "gumbel"])
@pytest.mark.parametrize("shape", SCORES, ids=lambda s: "x".join(map(str, s)))
def test_scores_shapes(shape, gumbel):
    _scores_case(*shape, torch.bfloat16, gumbel=gumbel)


@pytest.mark.parametrize("gumbel", [False, True], ids=["plain", "gumbel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SCORES[2:4], ids=lambda s: "x".join(map(str, s)))
def test_scores_dtypes(shape, dtype, gumbel):
    _scores_case(*shape, dtype, gumbel=gumbel)


@pytest.mark.parametrize("mask,valid,softcap,causal", [
    ("bool", "left_pad", 0.0, False),
    ("bool", None, 0.0, True),
    ("float", "left_pad", 30.0, True),
    (None, "left_pad", 0.0, True),
    (None, None, 0.0, False),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scores_masks(mask, valid, softcap, causal, dtype):
    _scores_case(2, 4, 4, 128, 1024, 1024, dtype, mask=mask, valid=valid, softcap=softcap, causal=causal)


@pytest.mark.parametrize("gumbel", [False, True], ids=["plain", "gumbel"])
def test_autotuned_scores_prefill(gumbel):
    _scores_case(1, 8, 4, 128, 4096, 4096, torch.bfloat16, gumbel=gumbel)
    _scores_case(1, 8, 4, 128, 32, 8192, torch.bfloat16, gumbel=gumbel)
