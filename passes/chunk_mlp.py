"""Compute a long prompt's MLPs a block of rows at a time (``kvfx::chunked_mlp``), so that their intermediates never
exist whole.

Patterns, as plain functions over the dynamo graph (one per MLP shape; :data:`PATTERNS`)::

    gated:  linear(act(linear(x, Wg, bg)) * linear(x, Wu, bu), Wd, bd)     (either operand order of the product)
    plain:  linear(act(linear(x, Wu, bu)), Wd, bd)

with ``act`` one of kvfx.chunked_mlp.ACTIVATIONS (F.silu, F.relu, F.gelu exact or tanh).  The matched nodes are
replaced by one op call when every intermediate is read only inside the pattern (nothing else needs it whole) and
one intermediate ``[rows, I]`` would exceed ``max_bytes``; rows are the product of x's leading dimensions, and a
graph whose row count is symbolic (a prompt of any length) is always chunked.  Decode graphs (a token per
sequence) stay as they are, for the compiler to fuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from kvfx.chunked_mlp import ACTIVATIONS
from kvfx.passes.graph_utils import arg, example, is_op, static_int


@dataclass(frozen=True)
class MlpMatch:
    x: Node
    gate: Node | None  # the gate projection's linear node; None for a plain MLP
    up: Node
    down: Node
    activation: str  # a key of ACTIVATIONS
    inner: tuple[Node, ...]  # every matched node but ``down``, producers first


def _linear(node) -> tuple[Node, Node, Node | None] | None:
    """``(input, weight, bias)`` of an F.linear call."""
    if not is_op(node, "linear") or node.op != "call_function":
        return None
    x, weight, bias = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    if not isinstance(x, Node) or not isinstance(weight, Node) or not (bias is None or isinstance(bias, Node)):
        return None
    return x, weight, bias


def _activation(node) -> tuple[str, Node] | None:
    """``(name, input)`` of an activation kvfx::chunked_mlp implements."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    x = arg(node, 0, "input")
    if not isinstance(x, Node):
        return None
    if is_op(node, "silu", "relu") and not arg(node, 1, "inplace", False):
        return ("silu" if is_op(node, "silu") else "relu"), x
    if is_op(node, "gelu"):
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(arg(node, 1, "approximate", "none"))
        return (name, x) if name in ACTIVATIONS else None
    return None


def gated_mlp(down: Node) -> MlpMatch | None:
    """``down(act(gate(x)) * up(x))``."""
    down_call = _linear(down)
    product = down_call[0] if down_call else None
    if not is_op(product, "mul") or len(product.args) != 2 or product.kwargs:
        return None
    for activated, up in (product.args, product.args[::-1]):
        act = _activation(activated)
        gate_call = _linear(act[1]) if act else None
        up_call = _linear(up)
        if gate_call and up_call and gate_call[0] is up_call[0]:  # both project the same x
            return MlpMatch(up_call[0], act[1], up, down, act[0], (act[1], activated, up, product))
    return None


def plain_mlp(down: Node) -> MlpMatch | None:
    """``down(act(up(x)))``."""
    down_call = _linear(down)
    act = _activation(down_call[0]) if down_call else None
    up_call = _linear(act[1]) if act else None
    if up_call is None:
        return None
    return MlpMatch(up_call[0], None, act[1], down, act[0], (act[1], down_call[0]))


PATTERNS = (gated_mlp, plain_mlp)  # tried in order on every linear node


def find_mlps(graph: torch.fx.Graph) -> list[MlpMatch]:
    """Every MLP of ``graph`` whose intermediates are read only inside it, none sharing a node with an earlier one
    (``linear -> act -> linear -> act -> linear`` is two overlapping plain MLPs: the first is taken)."""
    found, claimed = [], set()
    for node in graph.nodes:
        for pattern in PATTERNS:
            match = pattern(node)
            if match is None or not _self_contained(match):
                continue
            members = {*match.inner, match.down}
            if claimed.isdisjoint(members | {match.x}):
                found.append(match)
                claimed |= members
            break
    return found


def _self_contained(match: MlpMatch) -> bool:
    members = set(match.inner) | {match.down}
    return all(set(node.users) <= members for node in match.inner)


def chunk_rows(match: MlpMatch, max_bytes: int) -> int | None:
    """Rows per block for ``match``, or None where the whole intermediate fits in ``max_bytes`` (or its size is
    unknown: no example value)."""
    x, hidden = example(match.x), example(match.up)  # hidden: [..., I]
    if x is None or hidden is None:
        return None
    width = static_int(hidden.shape[-1])
    if width is None:
        return None
    row_bytes = width * hidden.element_size()
    rows = 1
    for size in x.shape[:-1]:
        size = static_int(size)
        if size is None:  # symbolic: a prompt of any length
            rows = None
            break
        rows *= size
    if rows is not None and rows * row_bytes <= max_bytes:
        return None
    return max(1, max_bytes // row_bytes)


def chunk_mlps(gm: GraphModule, max_bytes: int) -> int:
    """Replace every large self-contained MLP of ``gm`` by ``kvfx::chunked_mlp``, in place; the number replaced."""
    if max_bytes <= 0:
        return 0
    replaced = 0
    for match in find_mlps(gm.graph):
        rows = chunk_rows(match, max_bytes)
        if rows is None:
            continue
        _, w_up, b_up = _linear(match.up)
        _, w_down, b_down = _linear(match.down)
        w_gate, b_gate = _linear(match.gate)[1:] if match.gate is not None else (None, None)
        with gm.graph.inserting_before(match.down):
            call = gm.graph.call_function(
                torch.ops.kvfx.chunked_mlp.default,
                (match.x, w_gate, b_gate, w_up, b_up, w_down, b_down, match.activation, rows))
        call.meta.update(match.down.meta)
        match.down.replace_all_uses_with(call)
        for node in (match.down, *reversed(match.inner)):
            gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced


__all__ = ["MlpMatch", "PATTERNS", "chunk_mlps", "chunk_rows", "find_mlps", "gated_mlp", "plain_mlp"]
