"""A captured ``torch.fx`` graph made fast: two rewrites that change no value, and the
graph as one plain Python function.

- :func:`drop_identities` drops operations that only repeat a value (an alias, ``x * 1``,
  ``t(t(x))``);
- :func:`reuse_buffers` runs elementwise arithmetic in place on a buffer nothing reads
  afterwards, as eager autograd's own backward formulas do;
- :func:`replay_function` writes the graph as one function calling each operator through
  its C++ entry point, releasing each value after its last use.

The tests compare the numbers with and without the rewrites, bit for bit.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from pyro_vae import compat
from pyro_vae.compat import NotCompilable

__all__ = ["drop_identities", "replay_function", "reuse_buffers"]


def _layout(node: Any) -> Any:
    """``(shape, stride, dtype, device)`` of a node's value recorded at capture, or None."""
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not torch.is_tensor(value):
        return None
    return (tuple(value.shape), tuple(value.stride()), value.dtype, value.device)


def _unit(value: Any) -> bool:
    return type(value) in (int, float) and value == 1


def _identity_source(node: torch.fx.Node) -> Any:
    """The node whose value ``node`` merely repeats, element for element and bit for bit,
    or None: an alias, an expand or view to its own shape, ``t(t(x))``, ``neg(neg(x))``,
    ``x * 1``, ``x / 1``, ``x ** 1`` (never ``x + 0``, which turns -0.0 into +0.0)."""
    aten = torch.ops.aten
    target, args = node.target, node.args
    first = args[0] if args else None
    if not isinstance(first, torch.fx.Node) or node.kwargs and target is not aten.alias.default:
        return None
    if target in (aten.alias.default, aten.expand.default, aten.view.default):
        return first
    if target in (aten.t.default, aten.neg.default) and first.target is target:
        return first.args[0]
    if target in (aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar) and len(args) == 2:
        return first if _unit(args[1]) else None
    return None


def drop_identities(graph: torch.fx.Graph) -> int:
    """Replace each operation that only repeats a value (:func:`_identity_source`) by that
    value, where the two have the same layout; returns how many were dropped.

    Eager autograd runs these too (Pyro's ``poutine.scale`` by 1, the ELBO's sum divided
    by one particle, the transposes of ``mm``'s backward); each costs a dispatch of a
    few microseconds per step and, for the arithmetic ones, a pass over its tensor. What
    the graph returns keeps memory of its own: a returned value is replaced only by a
    fresh result of the graph that no other returned value shares (each becomes a
    parameter's ``.grad``, never an input's memory or another gradient's)."""
    output = next(node for node in graph.nodes if node.op == "output")
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        source = _identity_source(node)
        if source is None or _layout(source) is None or _layout(source) != _layout(node):
            continue
        if node in output.all_input_nodes and not _may_return(source, node, output):
            continue
        node.replace_all_uses_with(source)
        dropped += 1
    graph.eliminate_dead_code()
    return dropped


def _aliases(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value may share memory with one of its operands."""
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is None or any(ret.alias_info is not None for ret in schema.returns)


def _memory(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose memory ``node``'s value lives in (through views and aliases)."""
    while node.op == "call_function" and _aliases(node):
        first = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
        if first is None:
            break
        node = first
    return node


def _may_return(source: torch.fx.Node, node: torch.fx.Node, output: torch.fx.Node) -> bool:
    """Whether the graph may return ``source`` in place of ``node``: a fresh result of an
    operation, whose memory no other returned value shares."""
    if source.op != "call_function" or _aliases(source):
        return False
    others = [other for other in output.all_input_nodes if other is not node]
    return all(_memory(other) is not source for other in others)


def _node_args(args: Any, kwargs: dict) -> list[torch.fx.Node]:
    nodes: list[torch.fx.Node] = []
    torch.fx.node.map_arg((args, kwargs), nodes.append)
    return nodes


def reuse_buffers(graph: torch.fx.Graph) -> int:
    """Compute an elementwise ``add``/``sub``/``mul``/``div`` in place in its first
    operand's memory where nothing reads that memory afterwards; returns how many.

    What eager autograd does itself: torch's backward formulas update fresh buffers in
    place (the Bernoulli log-density's ``sigmoid(logits).sub_(x).mul_(grad)``), but
    under ``make_fx`` they record out-of-place operations, so the graph would allocate
    (and, for a large tensor, page in) a new buffer for each. The same kernel computes
    the same values either way. Conditions, each checked on the graph: the operand's
    memory is that of an operation of the graph (never an input: a parameter or the data),
    no later operation or output uses it or any view of it, no other operand shares it,
    and it has the result's shape, strides and dtype, without overlap."""
    aten = torch.ops.aten
    inplace = {
        aten.add.Tensor: aten.add_.Tensor,
        aten.sub.Tensor: aten.sub_.Tensor,
        aten.mul.Tensor: aten.mul_.Tensor,
        aten.div.Tensor: aten.div_.Tensor,
    }
    nodes = list(graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    parent: dict[torch.fx.Node, torch.fx.Node] = {}  # a view (or alias) -> what it views

    def root(node: torch.fx.Node) -> torch.fx.Node:
        while node in parent:
            node = parent[node]
        return node

    for node in nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            parent[node] = node.args[0]  # (conservative: an item shares its source's memory)
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            return 0  # an operation whose aliasing is unknown: change nothing
        if any(ret.alias_info is not None for ret in schema.returns):
            first = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
            if first is None:
                return 0
            parent[node] = first
    last: dict[torch.fx.Node, int] = {}
    for node in nodes:
        for used in node.all_input_nodes:
            group = root(used)
            last[group] = max(last.get(group, -1), index[node])
    changed = 0
    for node in nodes:
        if node.op != "call_function" or node.target not in inplace:
            continue
        first = node.args[0]
        if not isinstance(first, torch.fx.Node):
            continue
        memory = root(first)
        value = first.meta.get("val")
        if (
            memory.op != "call_function"
            or last.get(memory) != index[node]
            or _layout(first) is None
            or _layout(first) != _layout(node)
            or value is None
            or not value.is_contiguous()
            or any(root(other) is memory for other in _node_args(node.args[1:], node.kwargs))
        ):
            continue
        node.target = inplace[node.target]
        own = root(node)
        parent[node] = first  # the result is now the operand's memory
        last[memory] = max(last.get(memory, -1), last.get(own, -1), index[node])
        changed += 1
    return changed


def replay_function(module: torch.fx.GraphModule) -> Callable:
    """``module``'s graph as one Python function: each operator called through its C++
    entry point, each value released after its last use (as torch.fx's own code does)."""
    nodes = list(module.graph.nodes)
    last_use = {}
    for index, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last_use[used] = index
    names: dict[torch.fx.Node, str] = {}
    bound: dict[str, Any] = {}

    def constant(value: Any) -> str:
        name = f"c{len(bound)}"
        bound[name] = value
        return name

    def source(value: Any) -> str:
        if isinstance(value, torch.fx.Node):
            return names[value]
        if isinstance(value, list):
            return "[" + ", ".join(source(v) for v in value) + "]"
        if isinstance(value, tuple):
            return "(" + "".join(source(v) + ", " for v in value) + ")"
        if value is None or isinstance(value, (bool, int)):
            return repr(value)
        return constant(value)  # floats (inf and nan too), dtypes, devices, ...

    inputs, lines = [], []
    for index, node in enumerate(nodes):
        names[node] = f"v{index}"
        if node.op == "placeholder":
            inputs.append(names[node])
        elif node.op == "get_attr":
            value = module
            for part in node.target.split("."):
                value = getattr(value, part)
            lines.append(f"v{index} = {constant(value)}")
        elif node.op == "call_function":
            arguments = [source(a) for a in node.args]
            arguments += [f"{key}={source(v)}" for key, v in node.kwargs.items()]
            entry = constant(compat.operator_entry(node.target))
            lines.append(f"v{index} = {entry}({', '.join(arguments)})")
        elif node.op == "output":
            lines.append(f"return {source(node.args[0])}")
            continue
        else:
            raise NotCompilable(f"the graph holds a {node.op} node")
        released = {names[used] for used in node.all_input_nodes if last_use[used] == index}
        if released:
            lines.append("del " + ", ".join(sorted(released)))
    code = f"def replay({', '.join(inputs)}):\n" + "".join(f"    {line}\n" for line in lines)
    scope: dict[str, Any] = {}
    exec(compile(code, "<pyro_vae.objectives.capture.codegen replay>", "exec"), bound, scope)
    return scope["replay"]
