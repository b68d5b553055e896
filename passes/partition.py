"""Split a rewritten decode graph into stages that a CUDA graph can replay and stages that must run on the host.

A decode step of a 16-layer model launches a few hundred kernels; launched one by one from Python (inductor's
wrapper, dynamo's guards) they cost far more host time than the GPU spends on them, and ``generate()`` waits for
every step. Replaying captured CUDA graphs removes that cost, but a whole decode graph cannot be captured:

- kvfx's attention ops keep host-side state (the cache's length, its eviction rule) that must advance every step;
- transformers' default cache grows by one token per step, so the graph has symbolic sizes (the 2-D attention mask,
  the cache views) whose kernels change their launch arguments every step.

So every node gets one of three classes:

- ``attention``: a ``kvfx::attention`` call (runs eagerly; its own decode step may replay a graph of its own);
- ``dynamic``: a node whose value has a symbolic size or is not a tensor, or that reads such a node (the mask built
  from the growing 2-D attention mask, the zero-storage cache views handed back to transformers);
- ``static``: everything else: the projections, norms, RoPE and MLPs between two attention calls, all of static
  shape. These are what a CUDA graph replays.

Nodes are then scheduled, in an order that respects their dependencies, into as few consecutive stages of one class
as possible (dynamic nodes only when nothing else can run), and
``torch.fx.passes.split_module`` makes each stage a submodule. The result has one static stage per gap between two
attention calls (``layers + 1`` for a plain decoder) and a dynamic stage or two: the mask, before the first attention,
and the cache views.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import free_symbols
from torch.fx.passes.split_module import split_module

ATTENTION, DYNAMIC, STATIC = "attention", "dynamic", "static"
# The class a new stage takes when the current one has no ready node: dynamic nodes wait until nothing else can run,
# so that the mask gathers in one stage before the first attention and the cache views in one stage at the end.
_PRIORITY = (STATIC, ATTENTION, DYNAMIC)


@dataclass(frozen=True)
class Stage:
    name: str  # the submodule's attribute name in the split module
    kind: str  # ATTENTION, DYNAMIC or STATIC
    nodes: int  # how many nodes of the original graph it holds
    escaping: tuple[int, ...]  # indices of its outputs that may outlive a step (returned, or read by a dynamic stage)


def is_attention(node: Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.kvfx.attention.default


_CONTINUING = 10  # kvfx::attention's ``continuing`` argument, by position (kvfx.passes.rewrite passes them so)


def _is_static_value(value) -> bool:
    if isinstance(value, (int, float, bool)):  # (a SymInt is none of these)
        return True
    if isinstance(value, torch.Tensor):
        return not free_symbols(value)
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_static_value(v) for v in value)
    return False


def is_growing_decode_graph(gm: GraphModule) -> bool:
    """The graph dynamo compiles for every decode step after the first: its kvfx attention calls continue a cache
    (their ``continuing`` argument) and an input has a symbolic size (the cache length). The prompt's graph and the
    first step's (static sizes, called once per sequence) are not it."""
    continuing = any(is_attention(n) and n.args[_CONTINUING] for n in gm.graph.nodes)
    return continuing and any(n.op == "placeholder" and not _is_static_value(_value(n)) for n in gm.graph.nodes)


def _value(node: Node):
    return node.meta.get("example_value", node.meta.get("val"))


def classify(gm: GraphModule) -> dict[Node, str]:
    """Every node's class (placeholders included: a placeholder is dynamic if its value has a symbolic size)."""
    kinds: dict[Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        value = _value(node)
        if is_attention(node):
            kinds[node] = ATTENTION
        elif node.op == "get_attr":
            kinds[node] = STATIC if isinstance(getattr(gm, str(node.target), None), torch.Tensor) else DYNAMIC
        elif not _is_static_value(value) or any(kinds[n] == DYNAMIC for n in node.all_input_nodes):
            kinds[node] = DYNAMIC
        else:
            kinds[node] = STATIC
    return kinds


def schedule(gm: GraphModule, kinds: dict[Node, str]) -> dict[Node, int]:
    """Each non-placeholder node's stage index: a list scheduling that keeps adding ready nodes of the current
    stage's class (in graph order) and opens a new stage only when none is ready."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    waiting = {n: sum(1 for i in n.all_input_nodes if i.op != "placeholder") for n in nodes}
    ready = [n for n in nodes if waiting[n] == 0]
    position = {n: i for i, n in enumerate(nodes)}
    stage_of: dict[Node, int] = {}
    stage, current = -1, None
    while ready:
        same = [n for n in ready if kinds[n] == current]
        if not same:
            current = next(k for k in _PRIORITY if any(kinds[n] == k for n in ready))
            stage += 1
            same = [n for n in ready if kinds[n] == current]
        node = min(same, key=position.__getitem__)
        ready.remove(node)
        stage_of[node] = stage
        for user in node.users:
            if user in waiting:
                waiting[user] -= 1
                if waiting[user] == 0:
                    ready.append(user)
    if len(stage_of) != len(nodes):  # a cycle cannot happen in an FX graph; a bug here must not go unnoticed
        raise RuntimeError("kvfx: graph partition left nodes unscheduled")
    return stage_of


def split_stages(gm: GraphModule) -> tuple[GraphModule, list[Stage]]:
    """``(split module, its stages in call order)``: a GraphModule that calls one submodule per stage and computes
    what ``gm`` computes."""
    kinds = classify(gm)
    stage_of = schedule(gm, kinds)
    stage_kind = {stage_of[n]: kinds[n] for n in stage_of}
    sizes: dict[int, int] = {}
    for index in stage_of.values():
        sizes[index] = sizes.get(index, 0) + 1
    split = split_module(gm, gm, lambda node: stage_of[node])  # (torch 2.11's has no tuple_return)
    calls = [n for n in split.graph.nodes if n.op == "call_module"]
    kind_of = {call: stage_kind[_stage_index(call)] for call in calls}
    stages = [Stage(str(call.target), kind_of[call], sizes[_stage_index(call)], _escaping(call, kind_of))
              for call in calls]
    return split, stages


def _stage_index(call: Node) -> int:
    return int(str(call.target).rsplit("_", 1)[-1])


def _escaping(call: Node, kind_of: dict[Node, str]) -> tuple[int, ...]:
    """The indices of a submodule's outputs that may outlive the step: returned by the split module, or read by a
    dynamic stage (which runs eagerly and may hand back a view of them). A submodule of several outputs returns a
    tuple that the split module unpacks with ``getitem(call, i)``; one of a single output returns it bare (index 0)."""
    def escapes(node: Node) -> bool:
        return any(user.op == "output" or kind_of.get(user) == DYNAMIC for user in node.users)

    items = [u for u in call.users if u.op == "call_function" and u.target is operator.getitem]
    if len(items) != len(call.users) or not _returns_tuple(call):
        return (0,) if escapes(call) else ()
    return tuple(sorted(int(item.args[1]) for item in items if escapes(item)))


def _returns_tuple(call: Node) -> bool:
    return returns_tuple(call.graph.owning_module.get_submodule(str(call.target)))


def returns_tuple(gm: GraphModule) -> bool:
    """Whether ``gm`` returns a tuple (split_module leaves a stage of one output returning it bare)."""
    return isinstance(output_node(gm).args[0], (tuple, list))


def output_node(gm: GraphModule) -> Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


__all__ = ["ATTENTION", "DYNAMIC", "STATIC", "Stage", "classify", "schedule", "split_stages", "is_attention",
           "is_growing_decode_graph", "returns_tuple", "output_node"]
