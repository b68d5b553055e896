"""Hand a prompt's boolean attention mask to kvfx::attention as its factors, so that the graph never builds it.

transformers builds the SDPA mask of a prompt in the graph as an AND of broadcast factors, then expands it::

    le = kv_index <= q_index                      # [1, 1, 1, Tk] vs [1, 1, Tq, 1]: causal
    pad = attention_mask[batch_index, kv_index]   # [B, 1, 1, Tk]
    mask = (ones & le.to(device) & pad.to(device)).expand(B, -1, Tq, Tk)   # [B, 1, Tq, Tk]: B * Tq * Tk bools

:func:`factor_bool_mask` reads such a tree back into its leaves (a bool tensor, or a comparison of two tensors,
kept unevaluated); the rewrite passes them to the op (see :mod:`kvfx.mask_factors`) and dead-code elimination drops
the ``[B, 1, Tq, Tk]`` mask. Any other mask (float, or a bool mask that is not such a tree) is passed as it is.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from kvfx.mask_factors import KINDS
from kvfx.passes.graph_utils import example, is_op, op_name


def factor_bool_mask(mask: Node) -> tuple[list[Node], list[int]] | None:
    """``(tensors, kinds)`` for kvfx::attention's ``mask_terms`` / ``mask_kinds`` (kinds index
    :data:`kvfx.mask_factors.KINDS`), or None when ``mask`` is not a bool AND-tree worth splitting."""
    value = example(mask)
    if value is None or value.dtype != torch.bool:
        return None
    root = mask
    while is_op(root, "expand"):
        root = root.args[0]
    leaves = _and_leaves(root)
    if leaves is None:
        return None
    tensors, kinds = [], []
    for leaf in leaves:
        compared = _comparison(_through_device_move(leaf))
        if compared is not None:
            name, a, b = compared
            tensors += [a, b]
            kinds.append(KINDS.index(name))
            continue
        leaf_value = example(leaf)
        if leaf_value is None or leaf_value.dtype != torch.bool:
            return None
        tensors.append(leaf)
        kinds.append(0)
    if kinds == [0] and root is mask:  # a single bool tensor: nothing to split
        return None
    return tensors, kinds


def _and_leaves(node: Node, depth: int = 0) -> list[Node] | None:
    """The operands of a tree of ANDs rooted at ``node`` (``[node]`` for a leaf); None past a sane depth."""
    if depth > 32:
        return None
    if _is_and(node):
        leaves = []
        for operand in node.args[:2]:
            if not isinstance(operand, Node):
                return None
            found = _and_leaves(operand, depth + 1)
            if found is None:
                return None
            leaves += found
        return leaves
    return [node]


def _is_and(node: Node) -> bool:
    return is_op(node, "and") and len(node.args) == 2 and not node.kwargs


def _through_device_move(node: Node) -> Node:
    """``x`` for ``x.to(device)`` (same dtype: only a move, the identity on the device it already runs on)."""
    while is_op(node, "to") and isinstance(node.args[0], Node):
        source, value = example(node.args[0]), example(node)
        if source is None or value is None or source.dtype != value.dtype:
            break
        node = node.args[0]
    return node


def _comparison(node: Node) -> tuple[str, Node, Node] | None:
    name = op_name(node)
    if name not in ("le", "lt", "ge", "gt") or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if not (isinstance(a, Node) and isinstance(b, Node) and example(a) is not None and example(b) is not None):
        return None
    return name, a, b
