"""A Pyro ELBO's loss and gradients on a module, captured once and replayed.

Pyro builds its traces in Python on every step: messengers, site dictionaries, the
replay of the guide's samples into the model. For a small model on CPU that Python work
is a sizeable share of each step, while the tensor work is the same every step.
:class:`CompiledLoss` runs the Pyro program and the ELBO once under
``make_fx`` (on fake tensors: no data, no arithmetic), recording the operations of the
loss *and* of its backward pass (``torch.autograd.grad`` at capture time) as one graph,
and replays that graph on later steps: fresh noise each time (the random ops are in the
graph), no Pyro bookkeeping, no autograd tape. :class:`CompiledFunction` does the same
for a function evaluated without gradients (``log_likelihood``'s importance weights).
The Pyro model, guide and ELBO stay the source of truth: a graph is what they computed,
and it is checked against them.

Guarantees:

- **A graph is reused only for what it baked in.** Its key holds the module's whole
  structure: every submodule's type, ``training`` flag, plain attributes (a dropout
  rate, an activation's slope) and hooks; every parameter's and buffer's name, shape,
  dtype, device and ``requires_grad``; the estimator's settings; the inputs' shapes,
  dtypes and devices; the default dtype. Freezing a layer, ``.eval()`` on a submodule,
  a swapped layer or likelihood: each is a new key, so a new graph, never a stale one.
  Plain attributes are described by value, also inside containers, plain objects (a
  hyperparameter namespace) and function closures. One thing no key sees: a module-level
  global that the model or guide reads is baked in when the graph is captured; keep
  quantities that change between fits on the module, or train with ``compile=False``.
- **Checked when built.** The step that captures a graph runs it and the eager ELBO
  from the same RNG state and buffer values; the loss, every gradient and every buffer
  must agree (relative 1e-5), or that key runs eagerly with a warning.
- **No side effects.** Capturing runs on fake tensors. The checking step counts as
  exactly one step: buffers (BatchNorm statistics) are updated once and the RNG advances
  as one eager step would.
- **Eager where a graph would be wrong.** Inside any Pyro handler (the KL warm-up's
  :class:`~pyro_vae.training.schedules.LatentScale`, a user's ``poutine.scale``), under Pyro
  validation, autocast, or with gradients off (for the loss), for an owner that is not
  a ``torch.nn.Module``, a module with uninitialized (lazy) parameters, estimators not
  known to be static (:class:`~pyro_vae.objectives.free_bits.FreeBitsELBO` switches on a KL
  value), and models whose Python branches on tensor values, the ELBO runs eagerly.
- **Same numbers.** The graph holds the very operations autograd ran, so losses and
  gradients equal the eager ones (bit for bit on CPU in the tests). Two rewrites of the
  recorded graph change no value: operations that only repeat a value (an alias, ``x *
  1``, ``t(t(x))``) are dropped, and elementwise arithmetic on a buffer nothing reads
  afterwards runs in place, as eager autograd's own backward formulas do
  (:func:`drop_identities`, :func:`reuse_buffers`; tests compare with and without them).

Capturing costs time once: the first capture in a process imports torch's tracing stack,
and each graph takes time to capture and check.
:func:`capture_pays` weighs that against the Pyro bookkeeping a graph saves per call,
so that short work (a small evaluation, a tiny training run) stays eager.
"""

from __future__ import annotations

import math
import operator
import time
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import am_i_wrapped
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae import compat
from pyro_vae.compat import NotCompilable
from pyro_vae.models.protocol import private_param_store, scaled
from pyro_vae.models.vae import param_store_registration
from pyro_vae.objectives.closed_form import ClosedFormKL_ELBO, TraceELBO
from pyro_vae.objectives.importance import DReGELBO, ImportanceWeightedELBO
from pyro_vae.objectives.path import StickingTheLandingELBO
from pyro_vae.objectives.penalty import PenaltyObjective
from pyro_vae.objectives.registry import Objective
from pyro_vae.objectives.traces import site_total

__all__ = ["CompiledFunction", "CompiledLoss", "NotCompilable", "capture_pays", "module_state"]

#: relative agreement of the graph with the eager ELBO demanded when it is built or reused
TOLERANCE = 1e-5
#: graphs kept per module (least recently used dropped first)
MAX_GRAPHS = 32

#: Cost model for :func:`capture_pays`, measured on the development machine (2 CPU
#: cores; ``benchmarks/run.py`` reports the current values): Pyro's bookkeeping that a
#: replayed call saves, seconds to capture and check one graph, and seconds to import
#: torch's tracing stack for the first capture of a process.
SAVED_PER_CALL = 1e-3
CAPTURE_SECONDS = 0.25
IMPORT_SECONDS = 1.6

#: graphs by module, then by key: a second ``fit`` of the same module reuses them
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: calls made on each module in this process, eager or replayed, by work (the loss, or a
#: function): what the auto policy counts
_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def capture_pays(calls: int, graphs: int = 1) -> bool:
    """Whether capturing ``graphs`` graphs pays for itself over ``calls`` calls.

    Capturing costs :data:`CAPTURE_SECONDS` per graph, plus :data:`IMPORT_SECONDS` once
    per process (``torch.optim`` optimizers import the same stack when first built, so
    training pays that anyway); each replayed call saves about :data:`SAVED_PER_CALL`
    seconds. With no graph to capture (all cached), any call pays.
    """
    cost = graphs * CAPTURE_SECONDS + (0.0 if compat.tracing_stack_loaded() else IMPORT_SECONDS)
    return calls * SAVED_PER_CALL > cost


# ---------------------------------------------------------------------- what a graph bakes in
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _value_key(value: Any, depth: int = 0) -> Any:
    """A hashable stand-in for an attribute's value, equal exactly when the value is.

    Containers, plain objects (a hyperparameter namespace, a dataclass) and functions (their
    code, defaults and closure cells) are described by what they hold, so changing a value
    inside them changes the key; other objects by themselves (held by the key, so that an
    identity is never reused)."""
    if isinstance(value, _PLAIN):
        return value
    if depth >= 6:
        return ("deep", id(value))
    inner = depth + 1
    if torch.is_tensor(value):  # (a capture refuses tensors that are not module inputs)
        return ("tensor", id(value), compat.tensor_version(value), tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_value_key(v, inner) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, _value_key(v, inner)) for k, v in value.items()))
    if isinstance(value, nn.Module):  # a module kept outside the module tree
        return ("module", id(value))
    if isinstance(value, types.FunctionType):
        cells = tuple(_cell_key(cell, value, inner) for cell in value.__closure__ or ())
        return ("function", value.__code__, _value_key(value.__defaults__, inner), cells)
    if isinstance(value, types.MethodType):
        return ("method", value.__func__, id(value.__self__))
    if not isinstance(value, type) and hasattr(value, "__dict__"):
        return ("object", type(value), _value_key(vars(value), inner))
    try:
        hash(value)
    except TypeError:
        return ("unhashable", id(value))
    return ("object", value)


def _cell_key(cell: Any, function: Any, depth: int) -> Any:
    try:
        contents = cell.cell_contents
    except ValueError:  # an empty cell
        return "empty"
    return "itself" if contents is function else _value_key(contents, depth)


def _attributes(module: nn.Module) -> tuple:
    """A module's plain attributes (not its parameters, buffers, submodules or flags)."""
    return tuple(
        (name, _value_key(value))
        for name, value in vars(module).items()
        if not name.startswith("_") and name != "training"
    )


@dataclass(frozen=True)
class ModuleState:
    """What a graph of ``owner`` depends on, and the tensors it takes, in its order.

    ``tensors`` holds the trainable parameters first (``trainable`` of them), then the
    frozen parameters, then the buffers; ``names`` their names in ``owner``.
    """

    key: Any
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    trainable: int
    buffers: tuple[torch.Tensor, ...]
    reason: str | None  # why no graph can be captured now, or None


def module_state(owner: nn.Module) -> ModuleState:
    """Walk ``owner`` once: the key of everything a graph would bake in, and its inputs."""
    from torch.nn.parameter import is_lazy

    modules = tuple(
        (name, type(module), module.training, _attributes(module), compat.module_hooks(module))
        for name, module in owner.named_modules()
    )
    parameters = list(owner.named_parameters())
    buffers = list(owner.named_buffers())
    if any(is_lazy(t) for _, t in parameters + buffers):
        reason = "the module has uninitialized (lazy) parameters; they are set on its first call"
        return ModuleState(modules, (), (), 0, (), reason)
    trainable = [(n, p) for n, p in parameters if p.requires_grad]
    ordered = trainable + [(n, p) for n, p in parameters if not p.requires_grad] + buffers
    spec = tuple((name, tuple(t.shape), t.dtype, t.device, t.requires_grad) for name, t in ordered)
    return ModuleState(
        key=(modules, spec, compat.global_module_hooks()),
        names=tuple(name for name, _ in ordered),
        tensors=tuple(t for _, t in ordered),
        trainable=len(trainable),
        buffers=tuple(t for _, t in buffers),
        reason=None,
    )


def largest(tensor: torch.Tensor) -> torch.Tensor:
    """``max |tensor|`` in one pass over it (NaN if it holds a NaN)."""
    low, high = torch.aminmax(tensor)
    return torch.maximum(high, -low)


def _largest_of_all(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``max |t|`` over all ``tensors`` (NaN if any holds a NaN), the same number as the
    largest of their :func:`largest`: one ``aminmax`` pass over each, then one reduction
    of all the minima and one of all the maxima (four operations in all, not three per
    tensor: the graph replays each operation on every step)."""
    extremes = [torch.aminmax(t) for t in tensors]
    low = torch.stack([low for low, _ in extremes]).amin()
    high = torch.stack([high for _, high in extremes]).amax()
    return torch.maximum(high, -low)


def _autocast_enabled() -> bool:
    return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))


# ---------------------------------------------------------------------- the loss as tensor ops
def reparameterized_trace_elbo(model_trace, guide_trace) -> torch.Tensor:
    """One particle of ``Trace_ELBO`` for a reparameterized guide, without host syncs.

    ``sum log p(x, z) - sum log q(z|x)`` over the traces' sample sites (scaled by the data
    plate), exactly ``Trace_ELBO``'s surrogate, whose value then equals its ELBO; Pyro's
    version also converts the value to a float (``.item()``), which a captured graph
    cannot replay.
    """
    value: torch.Tensor | float = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            value = value + site["log_prob_sum"]
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            if not site["fn"].has_rsample:
                raise NotCompilable(
                    f"guide site {site['name']!r} is not reparameterized: its "
                    f"score-function term needs the eager Trace_ELBO"
                )
            value = value - site["log_prob_sum"]
    return site_total(value)


#: the methods that make up a Trace_ELBO-family loss: a subclass that overrides one of
#: them computes something else, and is not captured as its base class
_TRACE_ELBO_METHODS = (
    "differentiable_loss",
    "loss",
    "loss_and_grads",
    "_differentiable_loss_particle",
    "_get_trace",
    "_get_traces",
    "_get_vectorized_trace",
    "differentiable_elbo_particle",
)
#: this project's estimators whose differentiable_loss is tensor operations only
_STATIC_PARTICLE_ELBOS = (
    ImportanceWeightedELBO,
    StickingTheLandingELBO,
    DReGELBO,
    PenaltyObjective,
)
#: the methods a ParticleELBO subclass defines its loss with
_PARTICLE_METHODS = (
    "differentiable_loss",
    "value_and_surrogate",
    "_elbo_and_surrogate",
    "bound",
    "_get_trace",
    "_get_traces",
    "_plate",
)


def _overridden(elbo: Any, base: type, methods: tuple[str, ...]) -> list[str]:
    """The methods of ``methods`` that ``type(elbo)`` defines differently from ``base``."""
    kind = type(elbo)
    return [m for m in methods if getattr(kind, m, None) is not getattr(base, m, None)]


def traceable_loss(elbo: Objective, capture: str = "auto") -> tuple[Callable | None, str | None]:
    """``(loss, None)``: the ELBO's differentiable loss ``(model, guide, *args, **kwargs)
    -> loss`` as tensor operations only; or ``(None, why)`` for an estimator not known to
    be static, which then runs eagerly.

    :param capture: the estimator's policy (see
        :data:`~pyro_vae.objectives.registry.CAPTURE_POLICIES`): ``"auto"`` decides by
        class (a subclass of a known estimator is captured as its base when it overrides
        none of the methods its loss is made of); ``"differentiable_loss"`` captures the
        ELBO's own ``differentiable_loss`` (checked against the eager loss when the graph
        is built); ``"never"`` is always eager.
    """
    if capture == "never":
        return None, f"{type(elbo).__name__} asks never to be captured"
    if capture == "differentiable_loss":
        return elbo.differentiable_loss, None
    base: type
    for base in (TraceELBO, ClosedFormKL_ELBO, Trace_ELBO):
        if type(elbo) is base or (
            isinstance(elbo, base) and not _overridden(elbo, base, _TRACE_ELBO_METHODS)
        ):
            return _trace_elbo_loss(elbo), None
    for base in _STATIC_PARTICLE_ELBOS:
        if type(elbo) is base or (
            isinstance(elbo, base) and not _overridden(elbo, base, _PARTICLE_METHODS)
        ):
            return elbo.differentiable_loss, None  # (a ParticleELBO's)
    kind = type(elbo).__name__
    for base in (Trace_ELBO, *_STATIC_PARTICLE_ELBOS):
        if isinstance(elbo, base):
            changed = _overridden(elbo, base, _TRACE_ELBO_METHODS + _PARTICLE_METHODS)
            return None, (
                f"{kind} overrides {', '.join(changed)} of {base.__name__}; if its loss is "
                f"tensor operations only, register it with capture='differentiable_loss'"
            )
    return None, (
        f"{kind} is not an estimator known to be static; if its differentiable_loss is "
        f"tensor operations only, register it with capture='differentiable_loss'"
    )


def _trace_elbo_loss(elbo: Any) -> Callable:
    if isinstance(elbo, ClosedFormKL_ELBO):
        particle = elbo.differentiable_elbo_particle
    else:
        particle = reparameterized_trace_elbo

    def loss(model, guide, *args, **kwargs):
        total: torch.Tensor | float = 0.0
        for model_trace, guide_trace in compat.elbo_traces(elbo, model, guide, args, kwargs):
            total = total - particle(model_trace, guide_trace) / elbo.num_particles
        return total

    return loss


# ---------------------------------------------------------------------- graphs
class _Runner(nn.Module):
    """``function(owner, *args)`` as a module, so that functional_call can swap the
    owner's parameters and buffers for the graph's inputs."""

    def __init__(self, owner: nn.Module, function: Callable) -> None:
        super().__init__()
        self.owner = owner
        self.function = function

    def forward(self, *args):
        return self.function(self.owner, *args)


class _Graph:
    """A captured graph: the ``torch.fx`` module (``module.code`` shows it) and the plain
    function that replays it."""

    def __init__(self, module: torch.fx.GraphModule, grad_index: list[int]) -> None:
        self.module = module
        self.replay = replay_function(module)
        self.grad_index = grad_index  # which trainable parameters receive a gradient


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
    exec(compile(code, "<pyro_vae.objectives.capture replay>", "exec"), bound, scope)
    return scope["replay"]


def _rng_devices(args: tuple) -> list[torch.device]:
    return sorted(
        {a.device for a in args if torch.is_tensor(a) and a.device.type == "cuda"}, key=str
    )


def _get_rng(devices: list[torch.device]) -> list[torch.Tensor]:
    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng(states: list[torch.Tensor], devices: list[torch.device]) -> None:
    torch.set_rng_state(states[0])
    for state, device in zip(states[1:], devices):
        torch.cuda.set_rng_state(state, device)


class _Captured:
    """Graphs of ``function(owner, *args)``, keyed by all they depend on, checked when
    built and when first reused. Subclasses say what the graph returns (:meth:`_joint`)
    and how it is checked against the eager function (:meth:`_check`).

    ``refresh_every_call`` (default) walks the owner on every call to build the key; a
    caller that knows the owner cannot change between its calls (``fit`` within an
    epoch) turns it off and calls :meth:`refresh` whenever the owner may have changed.
    """

    #: what the graph computes, for the fallback warning
    what = "the function"

    def __init__(self, owner: Any, enabled: bool = True, refresh_every_call: bool = True):
        self.owner = owner
        self.enabled = enabled
        self.refresh_every_call = refresh_every_call
        # an owner that is not a module (functional_call cannot swap its tensors) runs eagerly
        self._swappable = isinstance(owner, nn.Module)
        self._graphs: OrderedDict = (
            _GRAPHS.setdefault(owner, OrderedDict()) if (self._swappable) else OrderedDict()
        )
        self.fallbacks: dict[Any, str] = {}  # key -> why it runs eagerly
        self.capture_seconds = 0.0  # time spent capturing and checking graphs
        self._state: ModuleState | None = None
        self._prefix: _Hashed | None = None

    # ------------------------------------------------------------------ state
    def refresh(self) -> None:
        """Re-read the owner (its structure, flags, parameters) before the next call."""
        self._state = state = module_state(self.owner) if self._swappable else None
        self._prefix = None
        if state is not None and state.reason is None:
            try:
                self._prefix = _Hashed((self._identity(), state.key, torch.get_default_dtype()))
            except TypeError:  # an attribute or setting that cannot be hashed
                self._prefix = None

    def _identity(self) -> Any:
        raise NotImplementedError

    def _usable(self) -> bool:
        return (
            self.enabled
            and self._swappable
            and not am_i_wrapped()
            and not is_validation_enabled()
            and not _autocast_enabled()
        )

    #: what calls are counted under (per owner): the loss, or the function
    _work: Any = "loss"

    def calls(self) -> int:
        """Calls made on the owner in this process for the same work (any estimator's
        loss and gradients; or this function), eager or replayed: how much of it there
        has been, for the auto policy (:func:`capture_pays`)."""
        return _CALLS.get(self.owner, {}).get(self._work, 0) if self._swappable else 0

    def _count(self) -> None:
        if self._swappable:
            counts = _CALLS.setdefault(self.owner, {})
            counts[self._work] = counts.get(self._work, 0) + 1

    def cached_graphs(self) -> int:
        """Graphs ready in the cache for the owner as it is now (any input shapes)."""
        if not self._swappable:
            return 0
        if self.refresh_every_call or self._state is None:
            self.refresh()
        prefix = self._prefix
        return sum(1 for key, g in self._graphs.items() if g is not None and key[0] == prefix)

    # ------------------------------------------------------------------ running
    def _outputs(self, args: tuple, kwargs: dict):
        """``(graph, state, outputs)`` of this call from a graph, or ``None`` (eager)."""
        if not self._usable():
            return None
        if self.refresh_every_call or self._state is None:
            self.refresh()
        state = self._state
        if state is None:  # (refresh reads a swappable owner, as _usable requires)
            return None
        if state.reason is not None:
            self._note_fallback(("state", state.reason), state.reason, args)
            if state.reason.startswith("the module has uninitialized"):
                self._state = None  # its first call initializes it: look again next time
            return None
        try:
            signature = tuple(
                (a.shape, a.dtype, a.device, a.requires_grad) if torch.is_tensor(a) else a
                for a in args
            )
            key = (self._prefix, signature, tuple(sorted(kwargs.items())))
            if self._prefix is None:
                raise TypeError
            graph = self._graphs.get(key, _MISSING)
        except TypeError:
            self._note_fallback("unhashable", "an argument or attribute is not hashable", args)
            return None
        if graph is not _MISSING:
            return None if graph is None else (graph, state, self._run(graph, state, args))
        started = time.perf_counter()
        try:
            graph = self._capture(state, args, kwargs)
            outputs = self._run_checked(graph, state, args, kwargs)
        except NotCompilable as reason:
            self._graphs[key] = None
            self._note_fallback(key, str(reason), args)
            return None
        finally:
            self.capture_seconds += time.perf_counter() - started
        self._graphs[key] = graph
        while len(self._graphs) > MAX_GRAPHS:  # the least recently captured goes first
            self._graphs.popitem(last=False)
        return graph, state, outputs

    def _note_fallback(self, key: Any, reason: str, args: tuple) -> None:
        if key in self.fallbacks:
            return
        self.fallbacks[key] = reason
        warnings.warn(
            f"pyro-vae: {self.what} runs eagerly for inputs {_describe(args)}: {reason}",
            stacklevel=5,
        )

    def _run(self, graph: _Graph, state: ModuleState, args: tuple):
        return graph.replay(*[t.detach() for t in state.tensors], *args)

    def _run_checked(self, graph: _Graph, state: ModuleState, args: tuple, kwargs: dict):
        """Run the graph as this call's result, and check it against the eager function
        from the same RNG state and buffers; afterwards buffers and RNG are as after one
        call. Raises :class:`NotCompilable`, with everything as before the call, if the
        two disagree."""
        devices = _rng_devices(args)
        rng = _get_rng(devices)
        buffers = [b.detach().clone() for b in state.buffers]
        outputs = self._run(graph, state, args)
        graph_rng = _get_rng(devices)
        graph_buffers = [b.detach().clone() for b in state.buffers]
        _set_rng(rng, devices)
        _restore(state.buffers, buffers)
        try:
            with param_store_registration(False), private_param_store():
                self._check(graph, state, outputs, args, kwargs)
            if any(not _close(g, b) for g, b in zip(graph_buffers, state.buffers)):
                raise NotCompilable("the graph updates the buffers differently from the ELBO")
            if any(not torch.equal(a, b) for a, b in zip(graph_rng, _get_rng(devices))):
                raise NotCompilable("the graph draws random numbers differently from the ELBO")
        except BaseException:
            _set_rng(rng, devices)
            _restore(state.buffers, buffers)
            raise
        return outputs

    def _capture(self, state: ModuleState, args: tuple, kwargs: dict) -> _Graph:
        if any(torch.is_tensor(a) and a.requires_grad for a in args):
            raise NotCompilable("an input requires gradients")
        runner = _Runner(self.owner, self._function(kwargs))
        names = [f"owner.{name}" for name in state.names]
        grad_index: list[int] = []

        def joint(*flat):
            swapped, inputs = dict(zip(names, flat)), flat[len(names) :]
            return self._joint(runner, swapped, inputs, flat[: state.trainable], grad_index)

        example = [
            t.detach().requires_grad_(i < state.trainable) for i, t in enumerate(state.tensors)
        ]
        devices = _rng_devices(args)
        rng = _get_rng(devices)
        try:
            with param_store_registration(False), private_param_store(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # warnings belong to the eager check
                module = compat.make_fx_fake(joint)(*example, *args)
        except NotCompilable:
            raise
        except Exception as error:  # what the capture refused, e.g. a .item()
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            if "FakeTensor" in message:
                raise NotCompilable(
                    "the program uses a tensor that is neither a parameter nor a buffer of "
                    "the module (keep tensors on the module with register_buffer)"
                ) from None
            raise NotCompilable(
                f"the capture failed ({type(error).__name__}: {message[:200]})"
            ) from None
        finally:
            _set_rng(rng, devices)
        module.graph.eliminate_dead_code()  # e.g. the plates' unused index tensors
        drop_identities(module.graph)
        reuse_buffers(module.graph)
        self._schedule(module)
        module.recompile()
        return _Graph(module, list(grad_index))

    def _function(self, kwargs: dict) -> Callable:
        raise NotImplementedError

    def _joint(self, runner, swapped, args, trainable, grad_index):
        raise NotImplementedError

    def _schedule(self, module: torch.fx.GraphModule) -> None:
        """Reorder the captured graph's operations, if that helps (in place)."""

    def _check(self, graph: _Graph, state: ModuleState, outputs, args: tuple, kwargs: dict):
        raise NotImplementedError


_MISSING = object()


class _Hashed:
    """A key's fixed part with its hash computed once (the module's structure is a big
    tuple; hashing it on every step would cost more than the lookup it serves)."""

    __slots__ = ("value", "hash")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.hash = hash(value)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return other is self or (
            isinstance(other, _Hashed) and other.hash == self.hash and other.value == self.value
        )


def _restore(buffers: tuple[torch.Tensor, ...], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(buffers, values):
            buffer.copy_(value)


class CompiledLoss(_Captured):
    """``elbo``'s loss and gradients for ``owner.model`` / ``owner.guide``, from a graph.

    ``loss_and_grads(*args, scale=1.0, **kwargs)`` does what
    ``elbo.differentiable_loss(model, guide, *args, **kwargs).backward()`` does, with
    model and guide wrapped in ``poutine.scale(scale=scale)`` (the mini-batch scale
    ``num_data / batch``; part of the graph's key): gradients accumulate into the
    parameters' ``.grad``, and it returns the loss as a float. With ``enabled=False`` it
    is the eager ELBO.
    """

    what = "the loss"

    def __init__(
        self,
        elbo: Objective,
        owner: Any,
        model: str = "model",
        guide: str = "guide",
        enabled: bool = True,
        refresh_every_call: bool = True,
        capture: str = "auto",
    ) -> None:
        super().__init__(owner, enabled, refresh_every_call)
        self.elbo = elbo
        self.names = (model, guide)
        self.loss_fn, self.eager_reason = traceable_loss(elbo, capture)

    #: the largest magnitude of any gradient entry the last graph replay added (NaN if
    #: any entry is NaN), computed as each gradient is produced, while it is still in
    #: cache, for the trainer's finite check; ``None`` after an eager step
    grad_max: float | None = None

    def _identity(self) -> Any:
        settings = tuple(sorted((k, _value_key(v)) for k, v in vars(self.elbo).items()))
        methods = tuple(getattr(type(self.owner), name, None) for name in self.names)
        return (type(self.elbo), settings, self.names, methods)

    def loss_and_grads(self, *args, **kwargs) -> float:
        self._count()
        self._find_plate_nesting(args, kwargs)
        result = self._outputs(args, kwargs) if self.loss_fn is not None else None
        if result is None:
            return self._eager(args, kwargs)
        graph, state, outputs = result
        trainable = state.tensors[: state.trainable]
        for index, grad in zip(graph.grad_index, outputs[2:]):
            param = trainable[index]
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)
        self.grad_max = outputs[1].item()
        return outputs[0].item()

    def _find_plate_nesting(self, args: tuple, kwargs: dict) -> None:
        """Find the ELBO's plate nesting eagerly, before any graph is captured: found
        during a capture, its run of the programs would land in the graph (and its key
        would change once it is known)."""
        elbo = self.elbo
        if getattr(elbo, "max_plate_nesting", 0) != math.inf or elbo.num_particles == 1:
            return
        find = getattr(elbo, "_guess_max_plate_nesting", None)
        if find is None:  # pragma: no cover - every Pyro ELBO has it
            return
        kwargs = dict(kwargs)
        scale = kwargs.pop("scale", 1.0)
        model, guide = (scaled(getattr(self.owner, name), scale) for name in self.names)
        find(model, guide, args, kwargs)

    def _eager(self, args, kwargs) -> float:
        self.grad_max = None
        kwargs = dict(kwargs)
        scale = kwargs.pop("scale", 1.0)
        model, guide = (scaled(getattr(self.owner, name), scale) for name in self.names)
        loss = self.elbo.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    def _usable(self) -> bool:
        return torch.is_grad_enabled() and super()._usable()

    def _function(self, kwargs: dict) -> Callable:
        loss_fn, (model, guide) = self.loss_fn, self.names
        if loss_fn is None:  # (only called for an estimator with a traceable loss)
            raise NotCompilable("the estimator has no traceable loss")
        kwargs = dict(kwargs)
        scale = kwargs.pop("scale", 1.0)

        def loss(owner, *args):
            return loss_fn(
                scaled(getattr(owner, model), scale),
                scaled(getattr(owner, guide), scale),
                *args,
                **kwargs,
            )

        return loss

    def _joint(self, runner, swapped, args, trainable, grad_index):
        loss = torch.func.functional_call(runner, swapped, args)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise NotCompilable("the loss is not a scalar tensor")
        grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        grad_index[:] = [i for i, g in enumerate(grads) if g is not None]
        used = [grads[i] for i in grad_index]
        grad_max = _largest_of_all(used) if used else loss.new_zeros(())
        return (loss.detach(), grad_max, *used)

    def _schedule(self, module: torch.fx.GraphModule) -> None:
        """Reduce each gradient (its extremes) right after the operation producing it."""
        output = next(node for node in module.graph.nodes if node.op == "output")
        for grad in output.args[0][2:]:
            for user in list(grad.users):
                if user.target is torch.ops.aten.aminmax.default:
                    grad.append(user)

    def _check(self, graph: _Graph, state: ModuleState, outputs, args: tuple, kwargs: dict):
        """The graph's loss and gradients against the eager ELBO's, same noise."""
        params = state.tensors[: state.trainable]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            loss = self._eager(args, kwargs)
            eager = [p.grad for p in params]
        finally:
            for p, grad in zip(params, saved):
                p.grad = grad
        if not _same_number(float(outputs[0]), loss):
            raise NotCompilable(f"the graph's loss {float(outputs[0])!r} is not the ELBO's {loss}")
        graph_grads = dict(zip(graph.grad_index, outputs[2:]))
        for i, expected in enumerate(eager):
            got = graph_grads.get(i)
            if expected is None and got is None:
                continue
            if expected is None or got is None:
                raise NotCompilable("the graph and the ELBO disagree on which parameters move")
            if not _close(got, expected):
                raise NotCompilable("the graph's gradients differ from the ELBO's")


class CompiledFunction(_Captured):
    """``function(owner, *args)`` without gradients (tensor in, tensor out), from a graph.

    For evaluation: :func:`pyro_vae.evaluation.log_likelihood` draws its importance
    weights through one. Checked against ``function`` like :class:`CompiledLoss`.
    """

    def __init__(
        self,
        function: Callable,
        owner: Any,
        enabled: bool = True,
        refresh_every_call: bool = True,
    ) -> None:
        super().__init__(owner, enabled, refresh_every_call)
        self.function = function
        self._work = function
        self.what = getattr(function, "__name__", "the function")

    def _identity(self) -> Any:
        return self.function

    def __call__(self, *args) -> torch.Tensor:
        self._count()
        result = self._outputs(args, {})
        if result is None:
            with torch.no_grad():
                return self.function(self.owner, *args)
        return result[2][0]

    def _function(self, kwargs: dict) -> Callable:
        return self.function

    def _joint(self, runner, swapped, args, trainable, grad_index):
        with torch.no_grad():
            output = torch.func.functional_call(runner, swapped, args)
        if not torch.is_tensor(output):
            raise NotCompilable("the function does not return a tensor")
        return (output,)

    def _check(self, graph: _Graph, state: ModuleState, outputs, args: tuple, kwargs: dict):
        with torch.no_grad():
            expected = self.function(self.owner, *args)
        if expected.shape != outputs[0].shape or not _close(outputs[0], expected):
            raise NotCompilable(f"the graph's values differ from {self.what}'s")


def _same_number(got: float, expected: float) -> bool:
    """Equal within :data:`TOLERANCE`, or the same non-finite value (a NaN step is
    reported by the trainer; it does not make the graph wrong)."""
    if not (math.isfinite(got) and math.isfinite(expected)):
        return got == expected or (math.isnan(got) and math.isnan(expected))
    return math.isclose(got, expected, rel_tol=TOLERANCE, abs_tol=1e-6)


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    if not got.is_floating_point():
        return torch.equal(got, expected)
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return torch.allclose(
        got, expected, rtol=TOLERANCE, atol=TOLERANCE * scale + 1e-12, equal_nan=True
    )


def _describe(args: tuple) -> str:
    return ", ".join(
        f"{tuple(a.shape)} {a.dtype}".replace("torch.", "") if torch.is_tensor(a) else repr(a)
        for a in args
    )
