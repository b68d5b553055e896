"""The slot-store decode step (kvfx.kernels.slot_decode): Triton kernels == torch reference.

CPU: the kernels under the Triton interpreter; GPU (``pytest -m gpu``): compiled. Each case builds a random store,
runs the write + attend + score + evict step through the kernels and through the reference on copies, and compares:
  out: max |kernel - ref| <= tol * max |ref|, tol as the scored decode kernel's tests (fp32 1e-5 interpreted and
      5e-5 compiled, bf16 8e-3: output rounding plus softmax weights rounded before the P.V product on the GPU);
  score: float32 whatever the inputs, <= 1e-4 * max(max |ref|, 1) (summation order, exp2, the noise's logs);
  pos, live, free, qpos and the written k/v: exactly equal. Eviction is made decisive: running scores start at
      distinct multiples of 10, more than the G <= 4 one step can add, and positions are distinct, so rounding cannot
      change which slot goes (a test below also lets the step's own scores decide, on fixed seeds).
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvfx.kernels.scored_decode_attention import GumbelScores, Scratch  # noqa: E402
from kvfx.kernels.slot_decode import (  # noqa: E402
    EvictionRule,
    SlotStore,
    slot_decode_step,
    slot_decode_step_reference,
    write_slot,
    write_slot_reference,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
OUT_TOL = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 5e-5, ("cuda", torch.bfloat16): 8e-3}
SCORE_TOL = 1e-4


def _case(device, dtype, *, B, Hkv, G, D, C, mask_kind, gumbel, softcap, accumulate, seed, decisive=True):
    gen = torch.Generator().manual_seed(seed)
    seen = C + 5 + int(torch.randint(0, 40, (1,), generator=gen))  # tokens before the new one
    pos = torch.full((B, Hkv, C), -1, dtype=torch.long)
    live = torch.zeros(B, Hkv, dtype=torch.long)
    free = torch.zeros(B, Hkv, dtype=torch.long)
    for b in range(B):
        for h in range(Hkv):
            n = int(torch.randint(0, C, (1,), generator=gen))  # live slots: at least one is empty
            slots = torch.randperm(C, generator=gen)[:n]
            pos[b, h, slots] = torch.randperm(seen, generator=gen)[:n].sort().values
            live[b, h] = n
            free[b, h] = int((pos[b, h] < 0).nonzero()[int(torch.randint(0, C - n, (1,), generator=gen))])
    base = torch.randperm(B * Hkv * C, generator=gen).view(B, Hkv, C).float() * 10
    base = base if decisive else torch.zeros(B, Hkv, C)
    store = SlotStore(
        k=torch.randn(B, Hkv, C, D, generator=gen).to(dtype), v=torch.randn(B, Hkv, C, D, generator=gen).to(dtype),
        pos=pos, score=torch.where(pos >= 0, base, 0.0), live=live, free=free)
    hq = Hkv * G
    q = torch.randn(B, hq, D, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(B, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    tk = seen + 1 - int(torch.randint(0, 4, (1,), generator=gen))  # the mask may start after position 0
    row = None
    if mask_kind == "bool":
        row = torch.rand(B, 1, tk, generator=gen) > 0.2
        row[..., -1] = True  # the new token is always seen
    elif mask_kind == "float":
        row = torch.where(torch.rand(B, 1, tk, generator=gen) > 0.2, 0.0, torch.finfo(torch.float32).min)
        row[..., -1] = 0.0
    elif mask_kind == "alibi":  # per query head, as MPT's position bias
        slopes = 2.0 ** -torch.arange(1, hq + 1, dtype=torch.float32)
        row = slopes.view(1, hq, 1) * (torch.arange(tk) - (tk - 1)).view(1, 1, tk)
        row = row.expand(B, hq, tk).clone()
        row[torch.rand(B, 1, tk, generator=gen).expand(B, hq, tk) < 0.2] = torch.finfo(torch.float32).min
        row[..., -1] = 0.0
    budget = (live + 1 - torch.randint(0, 3, (B, Hkv), generator=gen)).clamp_min(1)  # some rows over, some not
    rule = EvictionRule(
        budget=budget,
        lo=torch.randint(0, seen // 3 + 1, (B, Hkv), generator=gen),
        hi=torch.where(torch.rand(B, Hkv, generator=gen) < 0.5, -torch.randint(0, 4, (B, Hkv), generator=gen),
                       torch.randint(seen // 2, seen + 2, (B, Hkv), generator=gen)),
        from_seen=torch.rand(Hkv, generator=gen) < 0.5,
        by_score=torch.rand(Hkv, generator=gen) < 0.5)
    rule = EvictionRule(rule.budget, rule.lo, torch.where(rule.from_seen.view(1, Hkv), rule.hi.clamp(max=0),
                                                          rule.hi.clamp_min(0)), rule.from_seen, rule.by_score)
    mask_tensor = None if row is None else row.to(dtype) if row.is_floating_point() and dtype != torch.float32 else row
    kwargs = dict(seen=seen + 1, scale=D**-0.5, softcap=softcap, mask_row=mask_tensor, mask_offset=seen + 1 - tk,
                  masked_below=-float("inf") if row is None or row.dtype == torch.bool
                  else torch.finfo(mask_tensor.dtype).min / 2,
                  gumbel=GumbelScores(seed=seed, layer=3, tau=1.5) if gumbel else None, accumulate=accumulate)
    to = dict(device=device)
    move = lambda s: SlotStore(*(t.to(**to).clone() for t in (s.k, s.v, s.pos, s.score, s.live, s.free)))  # noqa: E731
    rule = EvictionRule(*(t.to(**to) for t in (rule.budget, rule.lo, rule.hi, rule.from_seen, rule.by_score)))
    if kwargs["mask_row"] is not None:
        kwargs["mask_row"] = kwargs["mask_row"].to(**to)
    return q.to(**to), k_new.to(**to), v_new.to(**to), move(store), move(store), rule, kwargs, seen


def _run_both(device, dtype, **case):
    q, k_new, v_new, fast, ref, rule, kwargs, seen = _case(device, dtype, **case)
    qpos_fast, qpos_ref = (torch.full((q.shape[0],), -7, dtype=torch.long, device=device) for _ in range(2))
    write_slot(fast, k_new, v_new, seen, qpos_fast)
    write_slot_reference(ref, k_new, v_new, seen, qpos_ref)
    for name in ("k", "v", "pos", "score", "live"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), f"write_slot: {name} differs"
    assert torch.equal(qpos_fast, qpos_ref)
    out = slot_decode_step(q, fast, rule, qpos=qpos_fast, **kwargs)
    ref_store = SlotStore(ref.k.float(), ref.v.float(), ref.pos, ref.score, ref.live, ref.free)
    ref_out = slot_decode_step_reference(q.float(), ref_store, rule, qpos=qpos_ref, **kwargs)
    return out, ref_out, fast, ref


def _compare(out, ref_out, fast, ref, device, dtype):
    tol = OUT_TOL[(device, dtype)]
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    err = (out.float() - ref_out.float()).abs().max().item()
    assert err <= tol * max(ref_out.float().abs().max().item(), 1e-6), f"out: max err {err:.3g}"
    err = (fast.score - ref.score).abs().max().item()
    assert err <= SCORE_TOL * max(ref.score.abs().max().item(), 1.0), f"score: max err {err:.3g}"
    for name in ("pos", "live", "free"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), \
            f"{name} differs:\n{getattr(fast, name)}\n{getattr(ref, name)}"


CASES = dict(
    B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), D=st.sampled_from([16, 32]),
    C=st.integers(2, 70), mask_kind=st.sampled_from(["none", "bool", "float", "alibi"]), gumbel=st.booleans(),
    softcap=st.sampled_from([0.0, 5.0]), accumulate=st.booleans(), seed=st.integers(0, 2**16),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CASES)
def test_step_equals_reference_interpreted(**case):
    _compare(*_run_both("cpu", torch.float32, **case), "cpu", torch.float32)


@pytest.mark.gpu
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # each new case compiles
@given(**CASES)
def test_step_equals_reference_compiled(**case):
    _compare(*_run_both("cuda", torch.float32, **case), "cuda", torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gumbel", [False, True])
@pytest.mark.parametrize("use_counter", [False, True])
def test_steps_that_reuse_one_scratch_equal_the_reference(device, gumbel, use_counter):
    """A slot store's steps (200 slots: two splits) reuse their work buffers (score logits, partial outputs,
    eviction candidates): every step still equals the reference, so nothing of a step leaks into the next. With a
    device counter (what a step replayed from a CUDA graph reads), the kernels take the new token's position and
    the length from it, ignore the stale ints they are given, and advance it by one per step."""
    q, k_new, v_new, fast, ref, rule, kwargs, seen = _case(
        device, torch.float32, B=2, Hkv=2, G=4, D=16, C=200, mask_kind="bool", gumbel=gumbel, softcap=0.0,
        accumulate=True, seed=5)
    scratch = Scratch()
    counter = torch.full((1,), seen, dtype=torch.long, device=device) if use_counter else None
    gen = torch.Generator().manual_seed(9)
    row = kwargs.pop("mask_row")
    for step in range(4):
        qpos_fast, qpos_ref = (torch.zeros(q.shape[0], dtype=torch.long, device=device) for _ in range(2))
        given = seen if use_counter else seen + step  # with a counter: the first step's ints, every step
        write_slot(fast, k_new, v_new, given, qpos_fast, counter=counter)
        write_slot_reference(ref, k_new, v_new, seen + step, qpos_ref)
        kwargs["seen"] = seen + step + 1
        mask = torch.cat([row, torch.ones(*row.shape[:2], step, dtype=torch.bool, device=device)], dim=-1)
        out = slot_decode_step(q, fast, rule, qpos=qpos_fast, mask_row=mask, scratch=scratch, counter=counter,
                               **{**kwargs, "seen": given + 1})
        ref_out = slot_decode_step_reference(q, ref, rule, qpos=qpos_ref, mask_row=mask, **kwargs)
        _compare(out, ref_out, fast, ref, device, torch.float32)
        assert torch.equal(qpos_fast, qpos_ref)
        if use_counter:
            assert int(counter) == seen + step + 1
        q, k_new, v_new = (torch.randn(t.shape, generator=gen).to(device) for t in (q, k_new, v_new))
    assert scratch._buffers  # the buffers were made once and reused


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_steps_own_scores_choose_the_victim(device, seed):
    """All running scores start at 0: the slot that received the least attention this step goes."""
    results = _run_both(device, torch.float32, B=2, Hkv=2, G=2, D=32, C=40, mask_kind="none", gumbel=seed == 2,
                        softcap=0.0, accumulate=True, seed=seed, decisive=False)
    _compare(*results, device, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("C", [300, 6555])
def test_bf16_store_on_the_gpu(C):
    results = _run_both("cuda", torch.bfloat16, B=2, Hkv=2, G=4, D=128, C=C, mask_kind="bool", gumbel=True,
                        softcap=0.0, accumulate=True, seed=C)
    _compare(*results, "cuda", torch.bfloat16)
