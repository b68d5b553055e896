"""``kvfx::chunked_mlp``: a transformer MLP computed a block of rows at a time, so that a long prompt's
intermediate activations never exist whole.

A decoder's MLP acts on each token on its own::

    gated:  down(act(gate(x)) * up(x))      (Llama, Mistral, Qwen, Gemma)     x: [..., C]  ->  [..., C_out]
    plain:  down(act(up(x)))                 (MPT, GPT-style)

Its intermediates are ``[..., I]`` with I = 2.7-4x C: at a prompt of B x T = 262k tokens and I = 8192 in bfloat16,
each is 4 GiB, and the gate, the up projection and their product are alive together, the largest activation of a
prefill by far (the KV cache of a compressed spec is smaller).  This op flattens the leading dimensions to rows and
runs the same torch ops on ``chunk_rows`` rows at a time, writing each block of the output in place: the peak holds
one chunk's intermediates.  Every op is the one transformers runs eagerly (``F.linear``, the activation, ``*``) on a
slice of rows, so each output row is computed by the same ops as without chunking (a matmul library may still pick
a different algorithm for a different number of rows: equal within the dtype's rounding, not bitwise).

Passes insert it by name (kvfx.passes.chunk_mlp); it knows nothing of graphs or specs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def chunked_mlp_reference(x: Tensor, w_gate: Optional[Tensor], b_gate: Optional[Tensor], w_up: Tensor,
                          b_up: Optional[Tensor], w_down: Tensor, b_down: Optional[Tensor],
                          activation: str) -> Tensor:
    """The MLP as transformers computes it, all rows at once."""
    act = ACTIVATIONS[activation]
    if w_gate is None:  # plain
        hidden = act(F.linear(x, w_up, b_up))
    else:  # gated
        hidden = act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)
    return F.linear(hidden, w_down, b_down)


@torch.library.custom_op("kvfx::chunked_mlp", mutates_args=())
def chunked_mlp(
    x: Tensor,  # [..., C]
    w_gate: Optional[Tensor],  # [I, C], or None for a plain MLP
    b_gate: Optional[Tensor],  # [I] or None
    w_up: Tensor,  # [I, C]
    b_up: Optional[Tensor],  # [I] or None
    w_down: Tensor,  # [C_out, I]
    b_down: Optional[Tensor],  # [C_out] or None
    activation: str,  # a key of ACTIVATIONS
    chunk_rows: int,  # rows per block, >= 1
) -> Tensor:  # [..., C_out]
    if activation not in ACTIVATIONS:
        raise ValueError(f"kvfx::chunked_mlp: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    if chunk_rows < 1:
        raise ValueError(f"kvfx::chunked_mlp: chunk_rows is {chunk_rows}, not >= 1")
    rows = x.reshape(-1, x.shape[-1])  # [N, C]
    out = torch.empty(rows.shape[0], w_down.shape[0], dtype=torch.result_type(x, w_down), device=x.device)
    for start in range(0, rows.shape[0], chunk_rows):
        block = slice(start, start + chunk_rows)
        out[block] = chunked_mlp_reference(rows[block], w_gate, b_gate, w_up, b_up, w_down, b_down, activation)
    return out.reshape(*x.shape[:-1], w_down.shape[0])


@chunked_mlp.register_fake
def _chunked_mlp_fake(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation, chunk_rows):
    return x.new_empty(*x.shape[:-1], w_down.shape[0], dtype=torch.result_type(x, w_down))


__all__ = ["ACTIVATIONS", "chunked_mlp", "chunked_mlp_reference"]
