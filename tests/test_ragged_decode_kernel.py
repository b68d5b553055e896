"""Ragged head-wise decode attention (kvfx.kernels.ragged_decode_attention): Triton kernel == torch reference.

CPU: the kernels under the Triton interpreter; GPU (``pytest -m gpu``): compiled. Each case builds a random ragged
layout (per-head capacities, offsets = their cumulative sums, per-row lengths up to the capacity, empty slots inside
the used regions, stale slots after them that must not be read), random compensation tokens (some heads without one,
some with nothing but one) and a mask row (none, bool, float, per-query-head float as ALiBi, modest float biases
with a ``masked_below`` threshold among them), and compares the kernel with the reference on float32 copies of the
inputs:
  out: max |kernel - ref| <= tol * max |ref|, tol as the scored decode kernel's tests (fp32 1e-5 interpreted and
      5e-5 compiled, bf16 8e-3: output rounding plus softmax weights rounded before the P.V product on the GPU).
Every query head has something to attend (its head's compensation token, or a slot at the mask's last column, the
newest token), so the reference has no NaN; the empty head is tested on its own.
"""

import math
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvfx.kernels.ragged_decode_attention import (  # noqa: E402
    ragged_decode_attention,
    ragged_decode_attention_reference,
    supports,
)

OUT_TOL = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 5e-5,
           ("cpu", torch.bfloat16): 8e-3, ("cuda", torch.bfloat16): 8e-3}
FMIN = torch.finfo(torch.float32).min


def _case(device, dtype, *, B, Hkv, G, D, Dv, max_cap, mask_kind, softcap, num_splits, seed, min_cap=0):
    """Random inputs: (args, kwargs) of ragged_decode_attention (kwargs without num_splits), on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    caps = [rand(min_cap, max_cap) for _ in range(Hkv)]
    offsets = torch.tensor([0] + caps[:-1]).cumsum(0)
    N = sum(caps) + rand(0, 3)  # spare slots at the end of the row
    T = max(caps) + 4 + rand(0, 30)  # tokens seen so far; position T - 1 is the newest
    hq = Hkv * G

    comp_n = torch.where(torch.rand(B, Hkv, generator=gen) < 0.3, 0.0, 1.0 + 49.0 * torch.rand(B, Hkv, generator=gen))
    lengths = torch.zeros(B, Hkv, dtype=torch.long)
    # stale slots (past a head's length, and the spare ones) hold valid positions: reading them would show
    pos = torch.randint(0, T, (B, N), generator=gen)
    for b in range(B):
        for j in range(Hkv):
            if caps[j] == 0:
                comp_n[b, j] = max(float(comp_n[b, j]), 2.0)  # nothing but the compensation token
                continue
            n = rand(0, caps[j]) if rand(0, 5) else 0  # some heads keep no slot in this row
            if comp_n[b, j] == 0:
                n = max(n, 1)
            lengths[b, j] = n
            if n == 0:
                continue
            p = torch.randperm(T, generator=gen)[:n]  # distinct positions ...
            p[torch.rand(n, generator=gen) < 0.15] = -1  # ... and some empty slots
            if comp_n[b, j] == 0 and not (p == T - 1).any():  # the newest token, always attended, keeps
                p[rand(0, n - 1)] = T - 1  # the row from being all masked
            pos[b, offsets[j]:offsets[j] + n] = p

    tk = T - rand(0, 3)  # the mask row may start after position 0: earlier positions are not attended
    row, masked_below = None, -math.inf
    rb = B if rand(0, 1) else 1  # the row may broadcast over the batch
    if mask_kind == "bool":
        row = torch.rand(rb, 1, tk, generator=gen) > 0.25
        row[..., -1] = True
    elif mask_kind == "float":
        row = torch.where(torch.rand(rb, 1, tk, generator=gen) > 0.25, 0.0, FMIN)
        row[..., -1] = 0.0
    elif mask_kind == "alibi":  # per query head, as MPT's position bias
        slopes = 2.0 ** -torch.arange(1, hq + 1, dtype=torch.float32)
        row = (slopes.view(1, hq, 1) * (torch.arange(tk) - (tk - 1)).view(1, 1, tk)).expand(rb, hq, tk).clone()
        row[torch.rand(rb, 1, tk, generator=gen).expand(rb, hq, tk) < 0.25] = FMIN
        row[..., -1] = 0.0
    elif mask_kind == "graded":  # modest biases, the lower half of them at or below masked_below
        row = -3.0 * torch.rand(rb, hq if rand(0, 1) else 1, tk, generator=gen)
        row[..., -1] = 0.0
    if row is not None and row.is_floating_point():
        row = row.to(dtype)
        masked_below = -1.5 if mask_kind == "graded" else torch.finfo(dtype).min / 2

    args = (torch.randn(B, hq, D, generator=gen), torch.randn(B, N, D, generator=gen),
            torch.randn(B, N, Dv, generator=gen), pos, offsets, lengths, torch.randn(B, Hkv, D, generator=gen),
            torch.randn(B, Hkv, Dv, generator=gen), comp_n)
    floats = {0, 1, 2, 6, 7}  # q, k, v, comp_k, comp_v
    args = tuple((a.to(dtype) if i in floats else a).to(device) for i, a in enumerate(args))
    kwargs = dict(scale=D**-0.5 * 2.0, softcap=softcap, mask_row=None if row is None else row.to(device),
                  mask_offset=T - tk, masked_below=masked_below,
                  max_length=int(lengths.max()) + rand(0, 5))  # an upper bound, not always tight
    return args, kwargs


def _reference(args, kwargs):
    """The reference on float32 copies (the float mask row too)."""
    floats = {0, 1, 2, 6, 7}
    ref_args = tuple(a.float() if i in floats else a for i, a in enumerate(args))
    ref_kwargs = {key: val for key, val in kwargs.items() if key != "max_length"}
    row = ref_kwargs["mask_row"]
    if row is not None and row.is_floating_point():
        ref_kwargs["mask_row"] = row.float()
    return ragged_decode_attention_reference(*ref_args, **ref_kwargs)


def _compare(out, ref, device, dtype):
    tol = OUT_TOL[(device, dtype)]
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(ref).all(), "the case left a query head with nothing to attend"
    assert torch.isfinite(out.float()).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol * max(ref.float().abs().max().item(), 1e-6), f"out: max err {err:.3g}"


def _run(device, dtype, num_splits, **case):
    args, kwargs = _case(device, dtype, num_splits=num_splits, **case)
    out = ragged_decode_attention(*args, **kwargs, num_splits=num_splits)
    ref = _reference(args, kwargs)
    _compare(out, ref, device, dtype)
    return out, ref


CASES = dict(
    B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), D=st.sampled_from([16, 32]),
    Dv=st.sampled_from([16, 32]), max_cap=st.integers(0, 100),
    mask_kind=st.sampled_from(["none", "bool", "float", "alibi", "graded"]), softcap=st.sampled_from([0.0, 5.0]),
    num_splits=st.sampled_from([None, 1, 2, 3, 4]), seed=st.integers(0, 2**16),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CASES)
@example(B=1, Hkv=1, G=1, D=16, Dv=16, max_cap=3, mask_kind="none", softcap=0.0, num_splits=None, seed=2439)  # no
def test_equals_reference_interpreted(**case):  # mask row: positions before mask_offset are attended all the same
    _run("cpu", torch.float32, **case)


@pytest.mark.gpu
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # each new case compiles
@given(**CASES)
def test_equals_reference_compiled(**case):
    _run("cuda", torch.float32, **case)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_bf16_interpreted(num_splits):
    """bf16 on the CPU: the kernel writes float32 and torch rounds (the interpreter's own cast truncates)."""
    out, ref = _run("cpu", torch.bfloat16, num_splits, B=2, Hkv=2, G=2, D=32, Dv=32, max_cap=90, mask_kind="alibi",
                    softcap=0.0, seed=5)
    # interpreted, the products are float32 (on the bf16 inputs, as the reference's): the only bf16 error left is
    # the output's rounding to nearest, at most half a unit in the last place (2**-8 relative); truncation is not
    bound = 2.0**-8 * ref.abs() + 1e-5 * ref.abs().max()
    assert ((out.float() - ref).abs() <= bound).all()


def test_many_splits_interpreted():
    """20 splits of full 640-slot heads: the merge takes the partial outputs 16 at a time (two chunks, the second
    partly empty), and the last splits hold real slots."""
    args, kwargs = _case("cpu", torch.float32, B=2, Hkv=2, G=2, D=32, Dv=32, max_cap=640, min_cap=640,
                         mask_kind="none", softcap=0.0, num_splits=20, seed=21)
    args[5].fill_(640)  # every head full: its stale slots hold valid positions (see _case)
    kwargs["max_length"] = 640
    out = ragged_decode_attention(*args, **kwargs, num_splits=20)
    _compare(out, _reference(args, kwargs), "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("mask_kind", ["bool", "alibi"])
@pytest.mark.parametrize("num_splits", [None, 7])
def test_bf16_long_heads_on_the_gpu(mask_kind, num_splits):
    """Heads of 1500 to 3000 slots, rows using any part of them: several splits, the later ones empty for the
    rows with short heads."""
    _run("cuda", torch.bfloat16, num_splits, B=2, Hkv=3, G=4, D=128, Dv=128, max_cap=3000, min_cap=1500,
         mask_kind=mask_kind, softcap=0.0, seed=3000 + (num_splits or 0))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_an_empty_head_gives_zeros(num_splits):
    """Length 0 and no compensation token: a zero output for the head's queries (the reference: NaN); the other
    heads are unaffected."""
    args, kwargs = _case("cpu", torch.float32, B=2, Hkv=3, G=2, D=16, Dv=16, max_cap=60, min_cap=40,
                         mask_kind="bool", softcap=0.0, num_splits=num_splits, seed=11)
    lengths, comp_n = args[5].clone(), args[8].clone()
    lengths[1, 1], comp_n[1, 1] = 0, 0.0
    args = args[:5] + (lengths,) + args[6:8] + (comp_n,)
    out = ragged_decode_attention(*args, **kwargs, num_splits=num_splits)
    ref = _reference(args, kwargs)
    assert torch.isnan(ref[1, 2:4]).all()
    assert torch.equal(out[1, 2:4], torch.zeros_like(out[1, 2:4]))
    ref[1, 2:4] = 0.0
    _compare(out, ref, "cpu", torch.float32)


def test_only_compensation_tokens():
    """No slot at all (N = 0, max_length 0): the output is each head's comp_v."""
    B, Hkv, G, D = 2, 2, 2, 16
    q, comp_k, comp_v = torch.randn(B, Hkv * G, D), torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
    out = ragged_decode_attention(q, torch.empty(B, 0, D), torch.empty(B, 0, D), torch.empty(B, 0, dtype=torch.long),
                                  torch.zeros(Hkv, dtype=torch.long), torch.zeros(B, Hkv, dtype=torch.long), comp_k,
                                  comp_v, torch.full((B, Hkv), 3.0), scale=0.25, max_length=0)
    assert torch.allclose(out, comp_v.repeat_interleave(G, dim=1), rtol=0, atol=1e-6)


def _good():
    args, kwargs = _case("cpu", torch.float32, B=2, Hkv=2, G=2, D=16, Dv=16, max_cap=20, min_cap=5,
                         mask_kind="bool", softcap=0.0, num_splits=None, seed=1)
    return list(args), kwargs


def _bad_cases():
    def arg(i, make):
        def edit(args, kwargs):
            args[i] = make(args[i])
        return edit

    def kw(name, value):
        def edit(args, kwargs):
            kwargs[name] = value(kwargs) if callable(value) else value
        return edit

    return {
        "k head_dim": (arg(1, lambda k: k[..., :8]), "k head_dim"),
        "v rows": (arg(2, lambda v: v[:, 1:]), "v must be"),
        "q 4-d": (arg(0, lambda q: q[None]), "q must be"),
        "heads": (arg(4, lambda o: torch.zeros(3, dtype=torch.long)), "multiple of the KV heads"),
        "offsets float": (arg(4, lambda o: o.float()), "offsets must be an int32/int64"),
        "lengths shape": (arg(5, lambda n: n[:, :1].repeat(1, 3)), "lengths must be broadcastable"),
        "pos float": (arg(3, lambda p: p.float()), "pos must be an int32/int64"),
        "comp_k shape": (arg(6, lambda c: c[..., :8]), "comp_k must be broadcastable"),
        "comp_n bool": (arg(8, lambda c: c > 0), "comp_n must be"),
        "region": (arg(5, lambda n: n + 100), "must lie in the row"),
        "max_length": (kw("max_length", lambda kwargs: 1), "max_length 1 is below"),
        "max_length < 0": (kw("max_length", -1), "max_length must be >= 0"),
        "max_length tensor": (kw("max_length", torch.tensor(5)), "max_length must be a Python int"),
        "mask shape": (kw("mask_row", lambda kwargs: kwargs["mask_row"][:, :, None]), "mask_row must be"),
        "mask dtype": (kw("mask_row", lambda kwargs: kwargs["mask_row"].long()), "mask_row must be a bool"),
        "num_splits": (kw("num_splits", 0), "num_splits must be"),
        "softcap": (kw("softcap", -1.0), "softcap must be"),
        "dtype": (arg(1, lambda k: k.double()), "cannot run these inputs"),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_malformed_inputs_raise(name):
    args, kwargs = _good()
    ragged_decode_attention(*args, **kwargs)  # the unedited case runs
    edit, message = _bad_cases()[name]
    edit(args, kwargs)
    with pytest.raises(ValueError, match=message):
        ragged_decode_attention(*args, **kwargs)


def test_supports():
    q, k, v = torch.randn(1, 4, 32), torch.randn(1, 9, 32), torch.randn(1, 9, 16)
    assert supports(q, k, v, kv_heads=2) is None  # the tests run on the CPU under TRITON_INTERPRET=1
    assert "power of two" in supports(q, k, torch.randn(1, 9, 24))
    assert "multiple" in supports(q, k, v, kv_heads=3)
    assert "differs" in supports(q, k.half(), v)
    assert "contiguous" in supports(q, torch.randn(1, 32, 9).transpose(1, 2), v)
