"""CPU tests (Triton interpreter) of the scored decode-attention kernel and of the Gumbel hash's Triton side.

The ground truth is ``scored_decode_attention_reference`` on the exactly upcast fp32 inputs.  Tolerances:
  out, max |kernel - ref| <= tol * max |ref|: as kvfx.kernels.decode_attention's tests, for the same reason (the
      attention part is the same computation): fp32 1e-5 (summation order, exp2 vs exp), fp16 1e-3 and bf16 8e-3
      (the output is rounded to the dtype: half an ulp is 2^-11 / 2^-9 relative, doubled, with room for the GPU
      path, which also rounds the softmax weights before the P.V product).
  score, max |kernel - ref| <= 2e-5 * max(max |ref|, 1): scores are float32 whatever the input dtype, and the
      logits come from the same exactly upcast inputs on both sides (the interpreter upcasts the dot operands),
      so only fp32 summation order, exp2 vs exp and the noise's float32 logs differ.  A score is at most G.
"""

import os
import sys

import torch

# See tests/test_decode_attention_kernel.py: interpret every kernel only on a machine without CUDA.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kvfx.kernels.decode_attention as da  # noqa: E402
from kvfx.kernels.gumbel import gumbel_noise, gumbel_noise_reference, gumbel_row_key  # noqa: E402
from kvfx.kernels.scored_decode_attention import (  # noqa: E402
    GumbelScores,
    scored_decode_attention,
    scored_decode_attention_reference,
    supports,
)

OUT_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SCORE_TOL = 2e-5


def _check(out, score, ref_out, ref_score, dtype, what=""):
    assert out.dtype == dtype and score.dtype == torch.float32
    assert torch.isfinite(out.float()).all() and torch.isfinite(score).all(), f"non-finite result {what}"
    err = (out.float() - ref_out.float()).abs().max().item()
    bound = OUT_TOL[dtype] * max(ref_out.float().abs().max().item(), 1e-6)
    assert err <= bound, f"out: max err {err:.3g} > {bound:.3g} ({dtype}) {what}"
    err = (score - ref_score).abs().max().item()
    bound = SCORE_TOL * max(ref_score.abs().max().item(), 1.0)
    assert err <= bound, f"score: max err {err:.3g} > {bound:.3g} {what}"


def _ref32(q, k, v, bias, **kw):
    return scored_decode_attention_reference(q.float(), k.float(), v.float(), bias, **kw)


# ----------------------------------------------------------------------------- Gumbel hash, Triton side


def _noise_kernel(Out, Kpos, Hq, seed, layer, b, qpos, N: tl.constexpr):
    """Noise of (seed, layer, b, hq, qpos, kpos) for hq = program id, N key positions."""
    hq = tl.program_id(0)
    offs = tl.arange(0, N)
    row_key = gumbel_row_key(seed, layer, b, hq, qpos)
    tl.store(Out + hq * N + offs, gumbel_noise(row_key, tl.load(Kpos + offs)))


@pytest.mark.parametrize("kpos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "seed,layer,b,qpos",
    [(0, 0, 0, 0), (1234, 7, 3, 4095), (2**31 + 5, 2**32 - 1, 1, 2**31 - 1), (2**33 + 3, -2, 9, 17)],
)
def test_gumbel_triton_matches_torch(kpos_dtype, seed, layer, b, qpos):
    """The interpreted Triton helpers give the torch reference's noise (the hash bits are equal; the two float32
    logs may differ in the last bit), also when triton was imported without TRITON_INTERPRET."""
    N, Hq = 64, 3
    gen = torch.Generator().manual_seed(seed % 97)
    kpos = torch.randint(-(2**31), 2**31 - 1, (N,), dtype=torch.int64, generator=gen)
    kpos[:4] = torch.tensor([0, 1, -1, 62533353])  # 62533353: u rounds to 1 at (0, 0, 0, 0, 0), see gumbel.py
    kpos = kpos.to(kpos_dtype)
    out = torch.empty(Hq, N)
    # seed and layer reach kernels reduced modulo 2**32 (as the hash does first)
    da._interpreted(_noise_kernel)[(Hq,)](out, kpos, Hq, seed & 0xFFFFFFFF, layer & 0xFFFFFFFF, b, qpos, N=N)
    ref = gumbel_noise_reference(seed, layer, b, torch.arange(Hq).view(Hq, 1), qpos, kpos.view(1, N))
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_gumbel_reference_never_infinite():
    """(bits >> 8) + 0.5 rounds to 2**24 in float32 for the largest bits: clamped below u = 1."""
    g = gumbel_noise_reference(0, 0, 0, 0, 0, torch.tensor([62533353, 74303823]))
    assert torch.isfinite(g).all() and (g > 16.0).all()
    u = torch.rand(100000, generator=torch.Generator().manual_seed(0))
    assert float(-torch.log(-torch.log(u.clamp(1e-7, 1 - 2**-24))).max()) < g.min()  # the largest possible value


# ----------------------------------------------------------------------------- kernel vs reference


def _store(gen, B, H, S, D, dtype, layout):
    """A k or v slot store [B, H, S, D] with a contiguous last dim in the given layout."""
    if layout == "contiguous":
        return torch.randn(B, H, S, D, generator=gen).to(dtype)
    if layout == "bshd":
        return torch.randn(B, S, H, D, generator=gen).to(dtype).permute(0, 2, 1, 3)
    buf = torch.randn(B + 1, 2 * H, S + 3, D + 16, generator=gen).to(dtype)  # a slice of a bigger store
    return buf[1:, ::2, 2 : 2 + S, 8 : 8 + D]


def _bias(gen, kind, B, Hkv, Hq, S, holes):
    """A [B, Hb, S] float32 bias with -inf holes (every row keeps a finite entry)."""
    Hb = {"one": 1, "expand": 1, "kv": Hkv, "q": Hq, "batch_bcast": 1}[kind]
    Bb = 1 if kind == "batch_bcast" else B
    bias = torch.randn(Bb, Hb, S, generator=gen)
    bias[torch.rand(Bb, Hb, S, generator=gen) < holes] = float("-inf")
    bias[:, :, int(torch.randint(0, S, (1,), generator=gen))] = 0.25
    if kind == "expand":
        return bias.expand(B, Hq, S)  # stride 0 over the query heads
    if kind == "batch_bcast":
        return bias.expand(B, 1, S)  # stride 0 over the batch
    return bias


@st.composite
def cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        B=draw(st.integers(1, 3)),
        Hkv=draw(st.integers(1, 3)),
        G=draw(st.sampled_from([1, 2, 3, 4, 8])),
        D=draw(st.sampled_from([16, 32, 64, 128])),
        Dv=draw(st.sampled_from([None, None, 16, 64])),
        S=draw(st.one_of(st.integers(1, 200), st.sampled_from([1, 31, 32, 33, 65]))),
        layout=draw(st.sampled_from(["contiguous", "bshd", "sliced"])),
        bias=draw(st.sampled_from(["one", "expand", "kv", "q", "batch_bcast"])),
        holes=draw(st.sampled_from([0.0, 0.3, 0.9])),
        softcap=draw(st.sampled_from([0.0, 0.0, 20.0])),
        gumbel=draw(st.booleans()),
        tau=draw(st.sampled_from([1.0, 0.3, 2.5])),
        pos_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        num_splits=draw(st.sampled_from([None, 1, 2, 3, 5])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
    )


def _build(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, Hkv, G, D, S, dtype = c["B"], c["Hkv"], c["G"], c["D"], c["S"], c["dtype"]
    Hq = Hkv * G
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    k = _store(gen, B, Hkv, S, D, dtype, c["layout"])
    v = _store(gen, B, Hkv, S, c["Dv"] or D, dtype, c["layout"])
    bias = _bias(gen, c["bias"], B, Hkv, Hq, S, c["holes"])
    kw = dict(scale=D**-0.5, softcap=c["softcap"])
    if c["gumbel"]:
        kw["gumbel"] = GumbelScores(seed=int(torch.randint(0, 2**40, (1,), generator=gen)), layer=3, tau=c["tau"])
        kw["qpos"] = torch.randint(0, 10**6, (B, 2), generator=gen).to(c["pos_dtype"])[:, 1]  # strided
        kw["kpos"] = torch.randint(0, 10**6, (B, S, Hkv), generator=gen).to(c["pos_dtype"]).transpose(1, 2)
    return q, k, v, bias, kw


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_kernel_matches_reference(c):
    q, k, v, bias, kw = _build(c)
    out, score = scored_decode_attention(q, k, v, bias, num_splits=c["num_splits"], **kw)
    assert out.shape == (q.shape[0], q.shape[1], v.shape[-1]) and score.shape == k.shape[:3]
    _check(out, score, *_ref32(q, k, v, bias, **kw), c["dtype"], what=str(c))


@pytest.mark.parametrize("gumbel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [7, 19])
def test_gqa8_d128_store_slice_many_splits(gumbel, dtype, num_splits):
    """The benchmark's shape class (G=4, D=128) on a slice of a bigger store: 7 splits of an odd slot count, or 19
    splits that all hold slots (the finish kernel merges the partial outputs 8 splits at a time, the last chunk
    partly empty)."""
    gen = torch.Generator().manual_seed(1)
    B, Hkv, G, D = 2, 2, 4, 128
    S = 203 if num_splits == 7 else 600  # 600 = 19 splits of 32 slots (the interpreter's BLOCK_N), the last short
    live = S - 13
    store_k = torch.randn(B, Hkv, S + 100, D, generator=gen).to(dtype)
    store_v = torch.randn(B, Hkv, S + 100, D, generator=gen).to(dtype)
    k, v = store_k[:, :, 50 : 50 + S], store_v[:, :, 50 : 50 + S]
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    bias = torch.zeros(B, 1, S)
    bias[:, :, live:] = float("-inf")  # empty slots at the end of the store
    kw = dict(scale=D**-0.5)
    if gumbel:
        kw.update(gumbel=GumbelScores(5, 11, 0.5), qpos=torch.tensor([S + 200, S + 50]),
                  kpos=torch.arange(S).repeat(B, Hkv, 1))
    out, score = scored_decode_attention(q, k, v, bias, num_splits=num_splits, **kw)
    _check(out, score, *_ref32(q, k, v, bias, **kw), dtype)
    assert torch.equal(score[:, :, live:], torch.zeros_like(score[:, :, live:]))
    torch.testing.assert_close(score.sum(-1), torch.full((B, Hkv), float(G)))


@pytest.mark.parametrize("Hkv,G,Hb", [(2, 4, 4), (4, 2, 2), (2, 4, 8), (2, 4, 2), (4, 2, 1)])
def test_bias_head_layouts(Hkv, G, Hb):
    """Query head h reads bias row h // (Hq // Hb), for Hb dividing Hkv (one row per group) or not (per head)."""
    gen = torch.Generator().manual_seed(Hkv * 100 + G * 10 + Hb)
    B, D, S = 2, 16, 40
    q, k, v = (torch.randn(B, Hkv * G, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen),
               torch.randn(B, Hkv, S, 32, generator=gen))  # Dv != D
    bias = torch.randn(B, Hb, S, generator=gen)
    bias[torch.rand(B, Hb, S, generator=gen) < 0.3] = float("-inf")
    bias[..., 0] = 0.0
    kw = dict(scale=0.3, gumbel=GumbelScores(3, 4, 0.9), qpos=torch.tensor([50, 60], dtype=torch.int32),
              kpos=torch.randint(0, 50, (B, Hkv, S), generator=gen))
    out, score = scored_decode_attention(q, k, v, bias, num_splits=2, **kw)
    _check(out, score, *_ref32(q, k, v, bias, **kw), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_whole_splits_of_empty_slots(num_splits):
    """-inf slots fill whole splits (and a whole split for only some heads of a group): zero score there."""
    gen = torch.Generator().manual_seed(2)
    B, Hkv, G, D, S = 2, 2, 2, 32, 120
    q = torch.randn(B, Hkv * G, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    bias = torch.zeros(B, Hkv * G, S)
    bias[:, :, :100] = float("-inf")  # only the last 20 slots are live
    bias[1, 1, 100:119] = float("-inf")  # head 1 of row 1: the very last slot only
    out, score = scored_decode_attention(q, k, v, bias, scale=0.3, num_splits=num_splits)
    ref_out, ref_score = _ref32(q, k, v, bias, scale=0.3)
    _check(out, score, ref_out, ref_score, torch.float32)
    assert torch.equal(score[:, :, :100], torch.zeros_like(score[:, :, :100]))
    torch.testing.assert_close(out[1, 1], v[1, 0, -1])


def test_noise_changes_scores_not_output():
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, D, S = 1, 2, 2, 16, 50
    q, k, v = torch.randn(B, Hkv * G, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen), torch.randn(
        B, Hkv, S, D, generator=gen)
    bias = torch.zeros(B, 1, S)
    pos = dict(qpos=torch.tensor([60]), kpos=torch.arange(S).view(1, 1, S).expand(B, Hkv, S))
    out0, s0 = scored_decode_attention(q, k, v, bias, scale=0.25)
    out1, s1 = scored_decode_attention(q, k, v, bias, scale=0.25, gumbel=GumbelScores(1, 0, 1.0), **pos)
    out2, s2 = scored_decode_attention(q, k, v, bias, scale=0.25, gumbel=GumbelScores(2, 0, 1.0), **pos)
    assert torch.equal(out0, out1) and torch.equal(out1, out2)
    assert not torch.allclose(s0, s1) and not torch.allclose(s1, s2)
    # the noise follows the key position, not the slot: permuting slots permutes the scores
    perm = torch.randperm(S, generator=gen)
    _, s1p = scored_decode_attention(q, k[:, :, perm], v[:, :, perm], bias, scale=0.25, gumbel=GumbelScores(1, 0, 1.0),
                                     qpos=pos["qpos"], kpos=pos["kpos"][:, :, perm])
    torch.testing.assert_close(s1p, s1[:, :, perm], rtol=0, atol=1e-6)


@pytest.mark.parametrize("tau", [0.75, 1.3359375])  # exact in float32: the tensor holds the same temperature
def test_temperature_read_from_a_tensor_equals_the_number(tau):
    """A CUDA graph replays with whatever a tensor tau holds: the kernel reads it instead of taking 1 / tau as an
    argument. Scores within a float32 rounding of the reciprocal of those with the number, and of the reference; a
    new value in the same tensor is what the next call uses."""
    gen = torch.Generator().manual_seed(4)
    B, Hkv, G, D, S = 2, 2, 4, 32, 70
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((B, Hkv * G, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    bias = torch.zeros(B, 1, S)
    pos = dict(qpos=torch.tensor([90, 75]), kpos=torch.randperm(90, generator=gen)[:S].view(1, 1, S).expand(B, Hkv, S))
    held = torch.tensor([tau], dtype=torch.float32)
    out_t, s_t = scored_decode_attention(q, k, v, bias, scale=0.2, gumbel=GumbelScores(9, 2, held), **pos)
    out_n, s_n = scored_decode_attention(q, k, v, bias, scale=0.2, gumbel=GumbelScores(9, 2, tau), **pos)
    ref_out, ref_s = scored_decode_attention_reference(q, k, v, bias, scale=0.2, gumbel=GumbelScores(9, 2, held),
                                                       **pos)
    assert torch.equal(out_t, out_n)
    torch.testing.assert_close(s_t, s_n, rtol=1e-6, atol=1e-7)
    _check(out_t, s_t, ref_out, ref_s, torch.float32)
    held.fill_(2 * tau)
    _, s_2 = scored_decode_attention(q, k, v, bias, scale=0.2, gumbel=GumbelScores(9, 2, held), **pos)
    _, ref_2 = scored_decode_attention_reference(q, k, v, bias, scale=0.2, gumbel=GumbelScores(9, 2, 2 * tau), **pos)
    torch.testing.assert_close(s_2, ref_2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(s_2, s_t, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- supports / validation


def test_supports(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k = torch.randn(1, 2, 8, 64)
    assert supports(torch.randn(1, 4, 64), k) is None
    assert supports(torch.randn(1, 4, 64), k, torch.randn(1, 2, 8, 32)) is None
    assert "head_dim 96" in supports(torch.randn(1, 4, 96), torch.randn(1, 2, 8, 96))
    assert "value head_dim 48" in supports(torch.randn(1, 4, 64), k, torch.randn(1, 2, 8, 48))
    assert "dtype" in supports(torch.randn(1, 4, 64, dtype=torch.float16), k)
    assert "contiguous" in supports(torch.randn(1, 4, 64), torch.randn(1, 2, 64, 8).transpose(2, 3))
    assert supports(torch.randn(1, 4, 64), torch.randn(1, 3, 8, 64)) is not None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(da, "triton_interpreting", lambda: False)
    assert "TRITON_INTERPRET" in supports(torch.randn(1, 4, 64), k)


def test_errors():
    q, k = torch.randn(2, 4, 16), torch.randn(2, 2, 10, 16)
    bias = torch.zeros(2, 1, 10)
    with pytest.raises(ValueError, match="bias"):
        scored_decode_attention(q, k, k, torch.zeros(2, 3, 10), scale=1.0)  # 4 % 3 != 0
    with pytest.raises(ValueError, match="bias"):
        scored_decode_attention(q, k, k, torch.zeros(2, 1, 9), scale=1.0)
    with pytest.raises(ValueError, match="bias"):
        scored_decode_attention(q, k, k, torch.zeros(2, 1, 10, dtype=torch.int64), scale=1.0)
    with pytest.raises(ValueError, match="heads"):
        scored_decode_attention(torch.randn(2, 3, 16), k, k, bias, scale=1.0)
    with pytest.raises(ValueError, match="v "):
        scored_decode_attention(q, k, k[:, :, :9], bias, scale=1.0)
    with pytest.raises(ValueError, match="qpos and kpos"):
        scored_decode_attention(q, k, k, bias, scale=1.0, gumbel=GumbelScores(0, 0, 1.0))
    with pytest.raises(ValueError, match="tau"):
        scored_decode_attention(q, k, k, bias, scale=1.0, gumbel=GumbelScores(0, 0, 0.0),
                                qpos=torch.zeros(2, dtype=torch.int64), kpos=torch.zeros(2, 2, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="kpos"):
        scored_decode_attention(q, k, k, bias, scale=1.0, gumbel=GumbelScores(0, 0, 1.0),
                                qpos=torch.zeros(2, dtype=torch.int64), kpos=torch.zeros(2, 2, 10))
    positions = dict(qpos=torch.zeros(2, dtype=torch.int64), kpos=torch.zeros(2, 2, 10, dtype=torch.int64))
    for tau in (torch.ones(2), torch.ones(1, dtype=torch.float64)):
        with pytest.raises(ValueError, match="tensor gumbel.tau must be one float32 element"):
            scored_decode_attention(q, k, k, bias, scale=1.0, gumbel=GumbelScores(0, 0, tau), **positions)
    with pytest.raises(ValueError, match="num_splits"):
        scored_decode_attention(q, k, k, bias, scale=1.0, num_splits=0)
    with pytest.raises(ValueError, match="head_dim 8"):
        scored_decode_attention(torch.randn(2, 4, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8), bias,
                                scale=1.0)
