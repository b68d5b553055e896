"""Rewrite every matched attention and its cache update into kvfx ops.

For each attention site (in graph order, which is layer order):
1. match it with the pattern table and trace its keys and values back to the cache update (``cat``);
2. check that the cache tensors are used only by this attention and by the graph output;
3. replace the attention with ``kvfx::attention(q, k_new, v_new, handle, mask, ...)`` (a prompt's bool mask as
   its factors: kvfx.passes.factor_mask);
4. replace the cache tensors in the graph output with zero-storage views of the sequence handle, so that
   transformers' ``DynamicCache`` keeps no copy; the ``cat`` then has no users and dead-code elimination removes it.
Sites that cannot be handled are left untouched and reported with the reason: never silently wrong.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, GraphModule, Node

from kvfx.passes.attention_patterns import ATTENTION_PATTERNS, AttentionMatch, Unsupported
from kvfx.passes.cache_update import CacheRead, find_cache_updates, trace_cache_read
from kvfx.passes.factor_mask import factor_bool_mask
from kvfx.passes.graph_utils import example, is_op, shape
from kvfx.passes.rope import find_rope


@dataclass
class Site:
    layer: int
    kind: str
    reason: str | None = None  # why it was left unchanged; None if rewritten
    heads: tuple[int, int] | None = None  # (query heads, KV heads)
    cats: tuple[Node, ...] = ()  # the cache updates the rewrite made dead
    rope_missing: bool = False  # the plan re-rotates this layer's keys, but no RoPE was found on them
    mask_factored: bool = False  # the op takes the prompt's bool mask as its factors (kvfx.passes.factor_mask)


@dataclass
class RewriteReport:
    sites: list[Site] = field(default_factory=list)
    leftovers: list[tuple[Site, str]] = field(default_factory=list)  # cache copies DCE could not remove (a bug)
    unrecognised: list[str] = field(default_factory=list)  # cache updates feeding no attention kvfx recognised

    @property
    def rewritten(self) -> list[Site]:
        return [s for s in self.sites if s.reason is None]

    @property
    def unsupported(self) -> list[Site]:
        return [s for s in self.sites if s.reason is not None]

    def summary(self, spec_name: str) -> str:
        kinds = sorted({s.kind for s in self.rewritten}) or sorted({s.kind for s in self.sites})
        heads = sorted({s.heads for s in self.rewritten if s.heads})
        layout = ", ".join(_heads_label(h) for h in heads)
        detail = ", ".join(x for x in (", ".join(kinds), layout) if x)
        return (f"kvfx: {len(self.rewritten)}/{len(self.sites)} attention layers rewritten"
                f"{f' ({detail})' if detail else ''}, spec {spec_name}")


def _heads_label(heads: tuple[int, int]) -> str:
    hq, hkv = heads
    if hq == hkv:
        return "MHA"
    return "MQA" if hkv == 1 else f"GQA {hq // hkv}:1"


def find_attention_sites(graph: Graph) -> list[AttentionMatch | Unsupported]:
    """Every attention in the graph, in graph order, matched by the first pattern that recognises it."""
    sites = []
    for node in graph.nodes:
        for pattern in ATTENTION_PATTERNS:
            found = pattern(node)
            if found is not None:
                sites.append(found)
                break
    return sites


def kv_heads(sites: list[AttentionMatch | Unsupported]) -> int:
    """The number of KV heads of the first attention whose cache update is found (1 if none is)."""
    for found in sites:
        if isinstance(found, AttentionMatch):
            read = trace_cache_read(found.key)
            if isinstance(read, CacheRead) and isinstance(shape(read.new)[1], int):
                return shape(read.new)[1]
    return 1


def head_dims(sites: list[AttentionMatch | Unsupported]) -> tuple[int, int] | None:
    """(key, value) head dims of the first attention whose cache updates are found, or None."""
    for found in sites:
        if isinstance(found, AttentionMatch):
            key, value = trace_cache_read(found.key), trace_cache_read(found.value)
            if isinstance(key, CacheRead) and isinstance(value, CacheRead):
                dims = (shape(key.new) or (None,) * 4)[3], (shape(value.new) or (None,) * 4)[3]
                if all(isinstance(d, int) for d in dims):
                    return dims
    return None


def prompt_length(sites: list[AttentionMatch | Unsupported]) -> int | None:
    """The static number of new tokens of a graph that starts from an empty cache (a prefill), else None."""
    for found in sites:
        if isinstance(found, AttentionMatch):
            read = trace_cache_read(found.key)
            if isinstance(read, CacheRead) and not read.continuing:
                tokens = (shape(read.new) or (None,) * 3)[2]
                return tokens if isinstance(tokens, int) else None
    return None


def rewrite_attention(gm: GraphModule, sites: list[AttentionMatch | Unsupported], plan_id: int,
                      rope_layers: frozenset[int] = frozenset()) -> RewriteReport:
    """Rewrite the attention ``sites`` of ``gm`` (from :func:`find_attention_sites`) into kvfx ops, in place.

    Layers in ``rope_layers`` get their keys' RoPE inverse frequencies as an op input (to re-rotate kept keys)."""
    graph = gm.graph
    report = RewriteReport()
    output = next(n for n in graph.nodes if n.op == "output")
    handle: Node | None = None  # the fresh sequence's handle, made once per graph
    for layer, found in enumerate(sites):
        site = Site(layer, found.kind)
        report.sites.append(site)
        if isinstance(found, Unsupported):
            site.reason = found.reason
            continue
        plan = _plan_site(found, output)
        if isinstance(plan, str):
            site.reason = plan
            continue
        keys, values, keep_last = plan
        site.heads = (shape(found.query)[1], shape(keys.new)[1])
        site.cats = (keys.cat, values.cat)
        if not keys.continuing and handle is None:
            with graph.inserting_after(keys.new):  # before this layer's cache update and everything using it
                handle = graph.call_function(torch.ops.kvfx.begin_sequence.default, (keys.new, plan_id))
        site_handle = keys.past if keys.continuing else handle
        rope = find_rope(keys.new) if layer in rope_layers else None
        site.rope_missing = layer in rope_layers and rope is None
        site.mask_factored = _replace_attention(graph, found, keys, values, site_handle, layer, keep_last,
                                                rope and rope.inv_freq)
        _replace_cache_outputs(graph, output, keys, site_handle)
        _replace_cache_outputs(graph, output, values, values.past if values.continuing else handle)
    graph.eliminate_dead_code()
    report.leftovers = list(_materialised_caches(graph, report))
    reported = {s.output for s in sites if isinstance(s, Unsupported)}
    report.unrecognised = [c.name for c in find_cache_updates(graph) if not _reaches(c, reported)]
    graph.lint()
    gm.recompile()
    return report


def _plan_site(found: AttentionMatch, output: Node):
    keys, values = trace_cache_read(found.key), trace_cache_read(found.value)
    for read in (keys, values):
        if isinstance(read, str):
            return read
    if keys.continuing != values.continuing:
        return "keys and values come from caches in different states"
    q_shape, k_shape = shape(found.query), shape(keys.new)
    if q_shape is None or len(q_shape) != 4 or k_shape is None:
        return "the query is not a [B, H, T, D] tensor"
    if isinstance(q_shape[1], int) and isinstance(k_shape[1], int) and q_shape[1] % k_shape[1]:
        return f"{q_shape[1]} query heads are not a multiple of {k_shape[1]} KV heads"
    region = _region(found, keys, values)
    keep = set()
    for node in [keys.cat, values.cat, *region - {found.output}]:
        for user in node.users:
            if user in region:
                continue
            if node in (keys.cat, values.cat) and user is output:
                keep.add(0)
                continue
            last = _keep_last_slice(user, output) if node in (keys.cat, values.cat) else None
            if last is None:
                return f"{node.name} is also used outside the attention, by {user.name}"
            keep.add(last)
    keep.discard(0)
    if len(keep) > 1:
        return "keys and values keep different sliding windows"
    return keys, values, keep.pop() if keep else 0


def _region(found: AttentionMatch, keys: CacheRead, values: CacheRead) -> set[Node]:
    """The nodes the rewrite replaces: every node on a path from the cache updates to the attention output."""
    order = {node: i for i, node in enumerate(found.output.graph.nodes)}
    end = order[found.output]
    downstream, stack = set(), [keys.cat, values.cat]
    while stack:  # forward from the cache updates, up to the attention output
        for user in stack.pop().users:
            if user not in downstream and order.get(user, end + 1) <= end:
                downstream.add(user)
                stack.append(user)
    region, stack = {found.output}, [found.output]
    while stack:  # back from the output, within what the cache updates reach
        for parent in stack.pop().all_input_nodes:
            if parent in downstream and parent not in region:
                region.add(parent)
                stack.append(parent)
    return region


def _reaches(node: Node, targets: set[Node], limit: int = 64) -> bool:
    """Whether one of ``targets`` is computed from ``node`` (looking at most ``limit`` nodes downstream)."""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        current = stack.pop()
        if current in targets:
            return True
        for user in current.users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return False


def _keep_last_slice(user: Node, output: Node) -> int | None:
    """``n`` if ``user`` is ``cache[:, :, -n:]`` (a sliding-window layer's cache update) that goes to the output."""
    if not is_op(user, "getitem") or set(user.users) != {output}:
        return None
    index = user.args[1]
    if not isinstance(index, tuple) or len(index) < 3 or index[0] != slice(None) or index[1] != slice(None):
        return None
    window = index[2]
    if not isinstance(window, slice) or window.stop is not None or window.step is not None:
        return None
    if not isinstance(window.start, int) or window.start >= 0:
        return None
    return -window.start


def _replace_attention(graph, found: AttentionMatch, keys: CacheRead, values: CacheRead, handle, layer, keep_last,
                       inv_freq: Node | None):
    """Replace the attention of ``found`` by kvfx::attention; returns whether its mask went in as factors."""
    out_value = example(found.output)
    with graph.inserting_before(found.output):
        mask = found.bool_mask
        terms = [t if f == 1.0 else graph.call_function(torch.mul, (t, f)) for t, f in found.bias_terms]
        terms += [graph.call_function(torch.where, (cond, value, 0.0)) for cond, value in found.fills]
        if terms:
            mask = terms[0]
            for term in terms[1:]:
                mask = graph.call_function(torch.add, (mask, term))
        # a prompt's [B, 1, T, T] bool mask: its factors instead (a decode step's mask row is small: kept)
        factors = factor_bool_mask(mask) if mask is found.bool_mask and mask is not None and not keys.continuing \
            else None
        mask_terms, mask_kinds = factors if factors is not None else ([], [])
        attention = graph.call_function(
            torch.ops.kvfx.attention.default,
            (found.query, keys.new, values.new, handle, None if factors else mask, layer, found.scale,
             found.softcap, found.is_causal, keep_last, keys.continuing, found.kind == "eager", inv_freq,
             mask_terms, mask_kinds),
        )
        result = attention
        query_value = example(found.query)
        if out_value is not None and query_value is not None and out_value.dtype != query_value.dtype:
            result = graph.call_method("to", (attention, out_value.dtype))
    if out_value is not None:
        attention.meta["example_value"] = out_value
    found.output.replace_all_uses_with(result)
    return factors is not None


def _replace_cache_outputs(graph, output: Node, read: CacheRead, handle: Node) -> None:
    """Make the cache tensors the graph returns zero-storage views of ``handle`` with the same sizes."""
    users = [u for u in read.cat.users if u is output or (is_op(u, "getitem") and output in u.users)]
    if not users:
        return
    first_user = next(n for n in graph.nodes if n in users)
    with graph.inserting_before(first_user):
        sizes = [graph.call_method("size", (read.new, d)) for d in range(4)]
        new_shape = shape(read.new)
        if new_shape is not None:  # the sizes' values, as dynamo records them (kvfx.passes.partition reads them)
            for node, size in zip(sizes, new_shape):
                node.meta["example_value"] = size
        if read.continuing:
            total = graph.call_function(operator.add, (graph.call_method("size", (read.past, 2)), sizes[2]))
            base = graph.call_method("narrow", (read.past, 2, 0, 1))
        else:
            total, base = sizes[2], handle
        view = graph.call_method("expand", (base, sizes[0], sizes[1], total, sizes[3]))
    for user in users:
        if user is output:
            output.args = _replace_in(output.args, read.cat, view)
        else:  # the sliding-window slice: apply the same slice to the view
            user.replace_input_with(read.cat, view)


def _replace_in(value, old: Node, new: Node):
    if isinstance(value, (tuple, list)):
        return type(value)(_replace_in(v, old, new) for v in value)
    if isinstance(value, dict):
        return {k: _replace_in(v, old, new) for k, v in value.items()}
    return new if value is old else value


def _materialised_caches(graph: Graph, report: RewriteReport):
    """Rewritten layers whose cache ``cat`` survived dead-code elimination (it would still copy the cache)."""
    alive = set(graph.nodes)
    for site in report.rewritten:
        for cat in site.cats:
            if cat in alive:
                yield site, cat.name
