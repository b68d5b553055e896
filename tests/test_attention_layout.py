"""kvfx::attention returns [B, Hq, Tq, Dv] laid out as [B, Tq, Hq, Dv] (kvfx.ops.token_major), as its fake
implementation promises the compiler: the layout flash attention writes and the one transformers transposes the
output into next, so neither side copies it (1 GiB at the prompt's peak at B=8, T=32768, 32 heads, d=64)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kvfx.ops  # noqa: F401  (registers the ops)
from kvfx.plans import register_plan
from kvfx.spec import Spec

SPECS = {
    "identity": {"version": 1},
    "window": {"version": 1, "default": {"evict": {"method": "window", "sink": 2, "budget": 8}}},
    "kivi": {"version": 1, "default": {"quantize": {"method": "kivi", "bits": 4, "group": 8, "residual": 8}}},
}


def _call(q, k, v, handle, continuing, plan_id):
    return torch.ops.kvfx.attention(q, k, v, handle, None, 0, 0.25, 0.0, not continuing, 0, continuing, False,
                                    None, [], [])


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_prompt_and_decode_outputs_have_the_promised_layout(spec):
    plan_id = register_plan(Spec.from_dict(SPECS[spec]), num_layers=1, num_kv_heads=2)
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D = 2, 4, 2, 24, 16
    q, k, v = (torch.randn(B, h, T, D, generator=gen) for h in (Hq, Hkv, Hkv))
    handle = torch.ops.kvfx.begin_sequence(q, plan_id)
    prompt = _call(q, k, v, handle, False, plan_id)
    past = handle.expand(B, Hkv, T, D)  # what transformers hands back: a view of the handle
    step = _call(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], past, True, plan_id)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = _call(fq, fk, fv, mode.from_tensor(handle), False, plan_id)
    for out, rows in ((prompt, T), (step, 1)):
        assert out.shape == (B, Hq, rows, D)
        assert out.transpose(1, 2).is_contiguous()
    assert fake.stride() == prompt.stride()
