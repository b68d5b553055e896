"""Attention patterns: plain functions that recognise one spelling of attention each, in a table of candidates.

Each pattern takes a node and returns an :class:`AttentionMatch` (the node is the output of an attention), a
:class:`Unsupported` (it is an attention kvfx cannot handle, with the reason), or None (not an attention).

- ``sdpa_attention``: ``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``.
- ``eager_attention``: ``matmul(dropout(cast(softmax(f(matmul(q, k^T))))), v)`` where ``f`` is any sequence of
  scalar scaling, additive masks or biases, casts and a softcap ``tanh(x / c) * c`` (Gemma 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch.fx import Node

from kvfx.passes.graph_utils import arg, example, is_op, is_scalar, normalize_dim, shape


@dataclass
class AttentionMatch:
    kind: str  # "sdpa" | "eager"
    output: Node  # the node computing the attention output [B, Hq, Tq, Dv]
    query: Node  # [B, Hq, Tq, D]
    key: Node  # the key operand as the attention reads it (after repeat_kv), [B, Hq|Hkv, Tk, D]
    value: Node
    scale: float
    softcap: float = 0.0
    is_causal: bool = False
    bias_terms: list[tuple[Node, float]] = field(default_factory=list)  # additive mask/bias terms, with factors
    fills: list[tuple[Node, float]] = field(default_factory=list)  # masked_fill(condition, large negative value)
    bool_mask: Node | None = None  # an SDPA boolean mask (True = attend)


@dataclass
class Unsupported:
    kind: str
    output: Node
    reason: str


def sdpa_attention(node: Node) -> AttentionMatch | Unsupported | None:
    if not is_op(node, "sdpa"):
        return None
    q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    is_causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    if dropout != 0:
        return Unsupported("sdpa", node, f"attention dropout {dropout} (kvfx serves inference: call model.eval())")
    if not isinstance(is_causal, bool) or not (scale is None or is_scalar(scale)):
        return Unsupported("sdpa", node, "is_causal or scale is computed in the graph")
    if scale is None:
        scale = 1.0 / math.sqrt(shape(q)[-1])
    match = AttentionMatch("sdpa", node, q, k, v, float(scale), is_causal=is_causal)
    if isinstance(mask, Node):
        mask_value = example(mask)
        if mask_value is not None and mask_value.dtype.is_floating_point:
            match.bias_terms.append((mask, 1.0))
        else:
            match.bool_mask = mask
    elif mask is not None:
        return Unsupported("sdpa", node, "the attention mask is a constant")
    return match


def eager_attention(node: Node) -> AttentionMatch | Unsupported | None:
    if not is_op(node, "matmul"):
        return None
    probs = node.args[0]
    while is_op(probs, "to", "float", "type", "type_as", "dropout"):
        if is_op(probs, "dropout"):
            p, training = arg(probs, 1, "p", 0.5), arg(probs, 2, "training", True)
            if training and p != 0:
                return Unsupported("eager", node, f"attention dropout {p} in training mode (call model.eval())")
        probs = probs.args[0]
    if not is_op(probs, "softmax"):
        return None
    dim = arg(probs, 1, "dim")
    if dim is None or normalize_dim(dim, 4) != 3:
        return Unsupported("eager", node, f"softmax over dim {dim}, not the key dim")
    scores = _fold_scores(probs.args[0])
    if isinstance(scores, str):
        return Unsupported("eager", node, scores)
    query, key_t, scale, softcap, bias_terms, fills = scores
    key = _untranspose(key_t)
    if key is None:
        return Unsupported("eager", node, "the score matmul's second operand is not a transposed key tensor")
    return AttentionMatch("eager", node, query, key, node.args[1], scale, softcap=softcap, bias_terms=bias_terms,
                          fills=fills)


ATTENTION_PATTERNS = (sdpa_attention, eager_attention)


def _fold_scores(node):
    """Walk the scores back from the softmax input to ``matmul(q, k^T)``, folding what was applied on the way.

    Returns (q, k^T, scale, softcap, bias terms, fills) so that, before the softmax, scores =
    cap(scale * q k^T) + sum(factor * bias) + sum(where(condition, value, 0)) with cap(x) = softcap * tanh(x / softcap)
    when softcap > 0; or a reason string. A fill's value is large and negative, so the softmax is the same as for
    masked_fill (and later scaling does not change it).
    """
    steps = []  # outermost first
    for _ in range(16):
        if is_op(node, "matmul"):
            break
        if is_op(node, "to", "float", "type", "type_as", "contiguous"):
            node = node.args[0]
            continue
        if is_op(node, "masked_fill"):
            # scores.masked_fill(cond, -big) == scores + where(cond, -big, 0) once softmaxed (|scores| << big)
            cond, value = arg(node, 1, "mask"), arg(node, 2, "value")
            if not is_scalar(value) or value > -1e4:
                return f"the attention scores are masked_fill-ed with {value}, not a large negative number"
            steps.append(("masked_fill", (cond, float(value))))
            node = node.args[0]
            continue
        if is_op(node, "mul", "truediv", "add", "tanh"):
            a, b = node.args[0], (node.args[1] if len(node.args) > 1 else None)
            name = node.target if node.op == "call_method" else None
            if is_op(node, "tanh"):
                steps.append(("tanh", None))
                node = a
            elif is_op(node, "add"):
                chain, other = (a, b) if _leads_to_matmul(a) else (b, a)
                if not isinstance(other, Node):
                    return "a constant is added to the attention scores"
                steps.append(("add", other))
                node = chain
            else:
                chain, factor = (a, b) if isinstance(a, Node) else (b, a)
                if not is_scalar(factor):
                    return f"the attention scores are scaled by a tensor ({name or node.name}), not a number"
                if is_op(node, "truediv") and chain is not a:
                    return "the attention scores are a divisor"
                steps.append(("scale", 1.0 / factor if is_op(node, "truediv") else float(factor)))
                node = chain
            continue
        return f"unrecognised op {node.target!r} between the score matmul and the softmax"
    else:
        return "too many ops between the score matmul and the softmax"
    if not is_op(node, "matmul"):
        return "the softmax input does not come from a matmul of queries and keys"

    scale, post, softcap, bias_terms, fills = 1.0, 1.0, 0.0, [], []
    capped = False
    for step, value in reversed(steps):  # innermost first
        if step == "scale":
            if capped:
                post *= value
            else:
                scale *= value
            bias_terms = [(t, f * value) for t, f in bias_terms]
        elif step == "add":
            bias_terms.append((value, 1.0))
        elif step == "masked_fill":
            fills.append(value)
        elif step == "tanh":
            if capped or bias_terms or fills:
                return "a mask or bias is added before the softcap tanh"
            capped, post = True, 1.0
    if capped:
        # post * tanh(scale * s) == softcap * tanh((scale * post) * s / softcap) with softcap = post
        softcap, scale = post, scale * post
    return node.args[0], node.args[1], scale, softcap, bias_terms, fills


def _leads_to_matmul(node, depth: int = 12) -> bool:
    """Whether ``node`` is computed from a matmul through score ops only (which operand of an add is the scores)."""
    if not isinstance(node, Node) or depth == 0:
        return False
    if is_op(node, "matmul"):
        return True
    if not is_op(node, "to", "float", "type", "type_as", "contiguous", "mul", "truediv", "add", "tanh"):
        return False
    return any(_leads_to_matmul(a, depth - 1) for a in node.args if isinstance(a, Node))


def _untranspose(node) -> Node | None:
    """``k`` if ``node`` is ``k`` with its last two dims swapped."""
    if is_op(node, "transpose"):
        dims = {normalize_dim(d, 4) for d in node.args[1:3]}
        if dims == {2, 3}:
            return node.args[0]
    return None
