"""Find where an attention's keys or values come from: the KV-cache update ``cat([past, new], dim=-2)``.

transformers' ``DynamicCache.update`` concatenates the past tensors (graph inputs in decode, an in-graph empty
tensor when a cache starts empty) with the new keys/values, and GQA models then repeat each KV head for its query
heads (``repeat_kv``: ``x[:, :, None].expand(B, Hkv, G, T, D).reshape(B, Hkv * G, T, D)``). This module walks an
attention operand back through that repeat (and through casts and ``contiguous``) to the ``cat``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import Node

from kvfx.passes.graph_utils import arg, is_op, normalize_dim, shape, static_int


@dataclass
class CacheRead:
    """An attention operand traced back to its cache update."""

    cat: Node  # the cache update, [B, Hkv, Tpast + Tnew, D]
    past: Node  # the past cache tensor: a graph input (decode) or an in-graph empty tensor (fresh cache)
    new: Node  # the new keys or values, [B, Hkv, Tnew, D]
    continuing: bool  # True if the past is a non-empty graph input
    chain: list[Node] = field(default_factory=list)  # nodes between the cat and the attention (repeat_kv, casts)


def trace_cache_read(operand: Node) -> CacheRead | str:
    """Walk ``operand`` back to a cache update; returns a CacheRead, or a reason why it is not one."""
    chain: list[Node] = []
    node = operand
    for _ in range(8):
        if not isinstance(node, Node):
            return "an attention operand is a constant"
        if is_op(node, "cat"):
            return _cache_update(node, chain)
        if is_op(node, "contiguous", "to", "float", "type", "type_as"):
            chain.append(node)
            node = node.args[0]
            continue
        repeat = _repeat_kv_input(node)
        if repeat is None:
            break
        chain.extend(repeat[1])
        node = repeat[0]
    return "no KV-cache update (cat of past and new keys along the sequence) feeds this attention"


def find_cache_updates(graph) -> list[Node]:
    """Every ``cat`` in the graph that is a KV-cache update."""
    return [n for n in graph.nodes if is_op(n, "cat") and isinstance(_cache_update(n, []), CacheRead)]


def _cache_update(cat: Node, chain: list[Node]) -> CacheRead | str:
    tensors = arg(cat, 0, "tensors")
    out_shape = shape(cat)
    dim = arg(cat, 1, "dim", 0)
    if out_shape is None or len(out_shape) != 4 or not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return "the keys come from a concatenation that is not a [B, H, T, D] cache update"
    if normalize_dim(dim, 4) != 2:
        return f"the keys are concatenated along dim {dim}, not the sequence dim"
    past, new = tensors
    past_shape, new_shape = shape(past), shape(new)
    if new_shape is None or len(new_shape) != 4 or past_shape is None:
        return "the cache update's operands have no shape metadata"
    empty = len(past_shape) != 4 or static_int(past_shape[2]) == 0
    if empty and any(static_int(s) != 0 for s in past_shape):
        # Anything other than the empty lazily-initialised cache tensor.
        return "the cache update's past tensor is neither a [B, H, T, D] input nor empty"
    if not empty and past.op != "placeholder":
        return "the past keys are computed in the graph, not read from the cache"
    return CacheRead(cat=cat, past=past, new=new, continuing=not empty, chain=chain)


def _repeat_kv_input(node: Node) -> tuple[Node, list[Node]] | None:
    """If ``node`` repeats KV heads for their query-head group, return (the [B, Hkv, T, D] input, the nodes)."""
    if is_op(node, "repeat_interleave"):
        dim = arg(node, 2, "dim")
        if dim is not None and normalize_dim(dim, 4) == 1:
            return node.args[0], [node]
        return None
    if not is_op(node, "reshape", "view"):
        return None
    expand = node.args[0]
    if not is_op(expand, "expand"):
        return None
    unsqueezed = expand.args[0]
    if _is_unsqueeze_dim2(unsqueezed):
        source = unsqueezed.args[0]
        src, out = shape(source), shape(node)
        # [B, Hkv, T, D] -> [B, Hkv, G, T, D] -> [B, Hkv * G, T, D]: query head h reads KV head h // G.
        if src is not None and out is not None and len(src) == 4 and len(out) == 4:
            return source, [node, expand, unsqueezed]
    return None


def _is_unsqueeze_dim2(node) -> bool:
    if is_op(node, "unsqueeze"):
        return normalize_dim(arg(node, 1, "dim"), 5) == 2
    if is_op(node, "getitem"):
        index = node.args[1]
        return (
            isinstance(index, tuple)
            and len(index) >= 3
            and index[0] == slice(None) and index[1] == slice(None) and index[2] is None
            and all(i == slice(None) or i is Ellipsis for i in index[3:])
        )
    return False
