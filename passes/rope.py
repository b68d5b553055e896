"""Find the rotary position embedding (RoPE) applied to a layer's new keys.

Matched structure (transformers' ``apply_rotary_pos_emb`` with ``rotate_half``)::

    k_embed = k * cos[:, None] + cat([-k[..., D/2:], k[..., :D/2]], -1) * sin[:, None]

and, upstream of ``cos``, the graph input holding the inverse frequencies: the one 1-D float tensor of D/2 entries
that the cos computation reads. kvfx needs it to re-rotate kept keys to new positions (StreamingLLM's compact
positions); the shapes and structure are matched, never node names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from kvfx.passes.graph_utils import example, is_op, shape

_SEARCH_LIMIT = 64  # nodes visited upstream of cos before giving up


@dataclass
class RopeMatch:
    inv_freq: Node  # [D/2] float: rotation angle per unit position of each (i, i + D/2) pair
    head_dim: int


def find_rope(k_embed: Node) -> RopeMatch | None:
    """The RoPE of ``k_embed`` ``[B, H, T, D]`` if it is a full-width rotate-half embedding, else None."""
    if not is_op(k_embed, "add") or len(k_embed.args) != 2 or not all(isinstance(a, Node) for a in k_embed.args):
        return None
    k_shape = shape(k_embed)
    if not k_shape or not isinstance(k_shape[-1], int):
        return None
    head_dim = k_shape[-1]
    products = [_factors(a) for a in k_embed.args]
    if None in products:
        return None
    for (x, cos), (rotated, sin) in (products, products[::-1]):
        for cos_node, source in ((cos, x), (x, cos)):
            if _is_rotate_half(rotated, source) or _is_rotate_half(sin, source):
                inv_freq = _inv_freq_input(cos_node, head_dim // 2)
                if inv_freq is not None:
                    return RopeMatch(inv_freq, head_dim)
    return None


def _factors(node: Node):
    if not is_op(node, "mul") or len(node.args) != 2 or not all(isinstance(a, Node) for a in node.args):
        return None
    return node.args


def _is_rotate_half(node: Node, source: Node) -> bool:
    """``cat([-source[..., D/2:], source[..., :D/2]], dim=-1)``."""
    if not (is_op(node, "cat") and isinstance(node.args[0], (list, tuple)) and len(node.args[0]) == 2):
        return False
    first, second = node.args[0]
    return is_op(first, "neg") and _half_of(first.args[0], source) and _half_of(second, source)


def _half_of(node, source: Node) -> bool:
    return isinstance(node, Node) and is_op(node, "getitem") and node.args[0] is source


def _inv_freq_input(cos: Node, pairs: int) -> Node | None:
    """The 1-D float32 graph input of ``pairs`` entries that ``cos`` is computed from."""
    seen, stack = set(), [cos]
    while stack and len(seen) < _SEARCH_LIMIT:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        value = example(node)
        if node.op in ("placeholder", "get_attr") and isinstance(value, torch.Tensor):
            if value.dim() == 1 and value.shape[0] == pairs and value.dtype == torch.float32:
                return node
            continue
        stack.extend(node.all_input_nodes)
    return None


__all__ = ["RopeMatch", "find_rope"]
