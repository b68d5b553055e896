"""CPU tests (Triton interpreter) of the prefill attention column-score kernels.

The ground truth is ``attention_column_scores_reference`` on the exactly upcast fp32 inputs.  Tolerance, whatever
the input dtype: max |kernel - ref| <= 2e-5 * max(max |ref|, 1).  The scores are float32 sums of softmax weights
computed from the same exactly upcast inputs on both sides (the interpreter upcasts the dot operands), so only
fp32 summation order, exp2 vs exp and the noise's float32 logs differ; no output is rounded to the input dtype.
"""

import os
import sys

import torch

# See tests/test_decode_attention_kernel.py: interpret every kernel only on a machine without CUDA.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kvfx.kernels.attention_scores as cs  # noqa: E402
from kvfx.kernels.attention_scores import (  # noqa: E402
    attention_column_scores,
    attention_column_scores_reference,
    supports,
)
from kvfx.kernels.scored_decode_attention import GumbelScores  # noqa: E402

TOL = 2e-5


def _check(score, ref, what=""):
    assert score.dtype == torch.float32 and score.shape == ref.shape
    assert torch.isfinite(score).all(), f"non-finite score {what}"
    err = (score - ref).abs().max().item() if ref.numel() else 0.0
    bound = TOL * max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
    assert err <= bound, f"max err {err:.3g} > {bound:.3g} {what}"


def _ref32(q, k, **kw):
    return attention_column_scores_reference(q.float(), k.float(), **kw)


def _mask(gen, kind, B, Hq, Tq, Tk, dtype):
    """Masks broadcastable to [B, Hq, Tq, Tk], several with stride-0 dims."""
    if kind == "none":
        return None
    if kind == "bool_b1":  # transformers' [B, 1, Tq, Tk] bool mask
        return torch.rand(B, 1, Tq, Tk, generator=gen) > 0.3
    if kind == "bool_expanded":  # the same, expanded over heads (stride 0)
        return (torch.rand(B, 1, Tq, Tk, generator=gen) > 0.3).expand(B, Hq, Tq, Tk)
    if kind == "bool_keys":  # [B, 1, 1, Tk]: a key padding mask broadcast over queries
        return torch.rand(B, 1, 1, Tk, generator=gen) > 0.2
    if kind == "float_heads":  # ALiBi-like additive bias per head, -inf holes, in the input dtype
        slopes = torch.rand(1, Hq, 1, 1, generator=gen)
        bias = -slopes * (torch.arange(Tk)[None, None, None, :] - torch.arange(Tq)[None, None, :, None]).abs() / 8
        bias = bias.expand(B, Hq, Tq, Tk).clone()
        bias[torch.rand(B, Hq, Tq, Tk, generator=gen) < 0.2] = float("-inf")
        return bias.to(dtype)
    if kind == "float_2d":  # [Tq, Tk] float32, broadcast over batch and heads
        return torch.randn(Tq, Tk, generator=gen)
    raise AssertionError(kind)


@st.composite
def cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        B=draw(st.integers(1, 2)),
        Hkv=draw(st.integers(1, 2)),
        G=draw(st.sampled_from([1, 2, 3, 4])),
        D=draw(st.sampled_from([16, 32, 64])),
        Tq=draw(st.sampled_from([1, 5, 17, 40])),
        extra=draw(st.sampled_from([0, 0, 9, 70])),  # Tk = Tq + extra
        layout=draw(st.sampled_from(["contiguous", "bshd", "sliced"])),
        mask=draw(st.sampled_from(["none", "bool_b1", "bool_expanded", "bool_keys", "float_heads", "float_2d"])),
        causal=draw(st.booleans()),
        valid=draw(st.sampled_from([None, "left_pad", "holes"])),
        softcap=draw(st.sampled_from([0.0, 0.0, 10.0])),
        gumbel=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
    )


def _tensor(gen, B, H, T, D, dtype, layout):
    if layout == "contiguous":
        return torch.randn(B, H, T, D, generator=gen).to(dtype)
    if layout == "bshd":
        return torch.randn(B, T, H, D, generator=gen).to(dtype).permute(0, 2, 1, 3)
    buf = torch.randn(B, 2 * H, T + 5, D + 8, generator=gen).to(dtype)
    return buf[:, 1::2, 3 : 3 + T, 8:]


def _build(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, Hkv, G, D, Tq, dtype = c["B"], c["Hkv"], c["G"], c["D"], c["Tq"], c["dtype"]
    Hq, Tk = Hkv * G, c["Tq"] + c["extra"]
    q = _tensor(gen, B, Hq, Tq, D, dtype, c["layout"])
    k = _tensor(gen, B, Hkv, Tk, D, dtype, c["layout"])
    kw = dict(scale=D**-0.5, causal=c["causal"], softcap=c["softcap"],
              mask=_mask(gen, c["mask"], B, Hq, Tq, Tk, dtype))
    if c["valid"] == "left_pad":  # left padding: the first positions of row 0 are not tokens
        valid = torch.ones(B, Tk, dtype=torch.bool)
        valid[0, : Tk // 3] = False
        kw["valid"] = valid
    elif c["valid"] == "holes":
        kw["valid"] = torch.rand(B, Tk, generator=gen) > 0.25
    if c["gumbel"]:
        kw["gumbel"] = GumbelScores(seed=int(torch.randint(0, 2**40, (1,), generator=gen)), layer=5, tau=0.7)
    return q, k, kw


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_kernel_matches_reference(c):
    q, k, kw = _build(c)
    _check(attention_column_scores(q, k, **kw), _ref32(q, k, **kw), what=str(c))


@pytest.mark.parametrize("gumbel", [False, True])
def test_snapkv_window_split_keys(gumbel, monkeypatch):
    """Few queries against many keys (SnapKV's observation window): pass 1 splits the keys."""
    monkeypatch.setattr(cs, "_lse_num_splits", lambda *a: 3)
    gen = torch.Generator().manual_seed(4)
    B, Hkv, G, D, Tq, Tk = 1, 2, 4, 64, 8, 300
    q = torch.randn(B, Hkv * G, Tq, D, generator=gen).to(torch.bfloat16)
    k = torch.randn(B, Hkv, Tk, D, generator=gen).to(torch.bfloat16)
    kw = dict(scale=D**-0.5, causal=True, gumbel=GumbelScores(9, 1, 1.0) if gumbel else None)
    score = attention_column_scores(q, k, **kw)
    _check(score, _ref32(q, k, **kw))
    torch.testing.assert_close(score.sum(-1), torch.full((B, Hkv), float(G * Tq)))


def test_invalid_and_fully_masked_rows_add_nothing():
    gen = torch.Generator().manual_seed(5)
    B, Hkv, G, D, T = 2, 1, 2, 32, 40
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :10] = False  # row 0 is left-padded by 10
    mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    mask[1, :, 30] = False  # query 30 of row 1 sees nothing
    score = attention_column_scores(q, k, scale=0.2, causal=True, valid=valid, mask=mask)
    _check(score, _ref32(q, k, scale=0.2, causal=True, valid=valid, mask=mask))
    assert torch.equal(score[0, :, :10], torch.zeros_like(score[0, :, :10]))  # padding receives nothing
    torch.testing.assert_close(score.sum(-1), torch.tensor([[G * 30.0], [G * 39.0]]))  # one softmax per live row


def test_kernel_reads_bool_mask_as_bytes(monkeypatch):
    """A bool mask reaches the kernel as a uint8 view of the same memory, never as a float copy."""
    seen = []
    real = cs._da._interpreted

    def spy(kernel):
        inner = real(kernel)

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    seen.append(args[2])
                    return inner[grid](*args, **kw)

                return launch

        return Launcher()

    monkeypatch.setattr(cs._da, "_interpreted", spy)
    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 2, 16, 16, generator=gen), torch.randn(1, 1, 16, 16, generator=gen)
    mask = torch.rand(1, 1, 16, 16, generator=gen) > 0.5
    mask[..., 0] = True
    attention_column_scores(q, k, scale=0.25, mask=mask)
    assert seen and all(m.dtype == torch.uint8 and m.data_ptr() == mask.data_ptr() for m in seen)
    assert seen[0].stride()[1] == 0  # broadcast over the query heads


# ----------------------------------------------------------------------------- supports / validation


def test_supports(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert supports(torch.randn(1, 4, 3, 64), torch.randn(1, 2, 8, 64)) is None
    assert "head_dim 80" in supports(torch.randn(1, 4, 3, 80), torch.randn(1, 2, 8, 80))
    assert "dtype" in supports(torch.randn(1, 4, 3, 64).half(), torch.randn(1, 2, 8, 64))
    assert "heads" in supports(torch.randn(1, 4, 3, 64), torch.randn(1, 3, 8, 64))


def test_errors():
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="mask"):
        attention_column_scores(q, k, scale=1.0, mask=torch.ones(1, 4, 3, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        attention_column_scores(q, k, scale=1.0, mask=torch.ones(1, 4, 3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="valid"):
        attention_column_scores(q, k, scale=1.0, valid=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="heads"):
        attention_column_scores(torch.randn(1, 3, 3, 16), k, scale=1.0)
    with pytest.raises(ValueError, match="tau"):
        attention_column_scores(q, k, scale=1.0, gumbel=GumbelScores(0, 0, -1.0))
    with pytest.raises(ValueError, match="head_dim"):
        attention_column_scores(q, torch.randn(1, 2, 8, 32), scale=1.0)


def test_empty_query_gives_zeros():
    assert torch.equal(attention_column_scores(torch.randn(1, 2, 0, 16), torch.randn(1, 1, 5, 16), scale=1.0),
                       torch.zeros(1, 1, 5))
