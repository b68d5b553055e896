"""Small helpers to read dynamo FX graphs: op identity, arguments, and shape metadata (never node names)."""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

# A torch-level op can appear as a function (torch.transpose, torch.Tensor.transpose) or a method ("transpose").
_FUNCTION_NAMES = {
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", operator.matmul: "matmul",
    torch.softmax: "softmax", torch.nn.functional.softmax: "softmax", torch.Tensor.softmax: "softmax",
    torch.transpose: "transpose", torch.Tensor.transpose: "transpose",
    torch.reshape: "reshape", torch.Tensor.reshape: "reshape", torch.Tensor.view: "view",
    torch.Tensor.expand: "expand", torch.unsqueeze: "unsqueeze", torch.Tensor.unsqueeze: "unsqueeze",
    torch.repeat_interleave: "repeat_interleave", torch.Tensor.repeat_interleave: "repeat_interleave",
    torch.Tensor.contiguous: "contiguous", torch.Tensor.to: "to", torch.Tensor.float: "float",
    torch.Tensor.type_as: "type_as", torch.Tensor.type: "type",
    torch.mul: "mul", operator.mul: "mul", operator.imul: "mul", torch.Tensor.mul: "mul",
    torch.div: "truediv", operator.truediv: "truediv", operator.itruediv: "truediv", torch.Tensor.div: "truediv",
    torch.add: "add", operator.add: "add", operator.iadd: "add", torch.Tensor.add: "add",
    torch.tanh: "tanh", torch.Tensor.tanh: "tanh",
    operator.neg: "neg", torch.neg: "neg", torch.Tensor.neg: "neg",
    torch.nn.functional.dropout: "dropout", torch.dropout: "dropout",
    torch.nn.functional.scaled_dot_product_attention: "sdpa",
    operator.getitem: "getitem",
    torch.nn.functional.linear: "linear",
    torch.nn.functional.silu: "silu", torch.nn.functional.relu: "relu", torch.relu: "relu",
    torch.nn.functional.gelu: "gelu",
    torch.Tensor.masked_fill: "masked_fill", torch.where: "where",
    operator.and_: "and", operator.iand: "and", torch.logical_and: "and", torch.bitwise_and: "and",
    torch.Tensor.logical_and: "and", torch.Tensor.bitwise_and: "and", torch.Tensor.__and__: "and",
    operator.le: "le", torch.le: "le", torch.Tensor.le: "le", operator.lt: "lt", torch.lt: "lt", torch.Tensor.lt: "lt",
    operator.ge: "ge", torch.ge: "ge", torch.Tensor.ge: "ge", operator.gt: "gt", torch.gt: "gt", torch.Tensor.gt: "gt",
}
_METHOD_NAMES = {"div": "truediv", "view": "view", "logical_and": "and", "bitwise_and": "and", "__and__": "and"}


def op_name(node: Node) -> str | None:
    """The canonical name of the op a node calls ('cat', 'matmul', ...), or None."""
    if node.op == "call_function":
        return _FUNCTION_NAMES.get(node.target)
    if node.op == "call_method":
        return _METHOD_NAMES.get(node.target, node.target)
    return None


def is_op(node, *names: str) -> bool:
    return isinstance(node, Node) and op_name(node) in names


def arg(node: Node, index: int, name: str, default=None):
    """Argument ``name`` given positionally at ``index`` or as a keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def example(node) -> torch.Tensor | None:
    """The example (fake) tensor dynamo recorded for a node, if it is a tensor."""
    if not isinstance(node, Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def shape(node) -> tuple | None:
    value = example(node)
    return tuple(value.shape) if value is not None else None


def static_int(value) -> int | None:
    """``value`` as a Python int if it is one (or a SymInt with a known value), else None."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt) and value.node.is_constant():
        return int(value)
    return None


def is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim
