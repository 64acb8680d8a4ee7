"""A Pyro ELBO's loss and gradients on a VAE, captured once per input shape and replayed.

Pyro builds its traces in Python on every step: messengers, site dictionaries, the
replay of the guide's samples into the model. On this machine that is about 1 ms per
step, 15-25% of a 784-400-50 MLP step at batch 128 on two CPU cores. The tensor work
itself is the same every step. :class:`CompiledLoss` runs the Pyro program and the
ELBO once under :func:`torch.fx.experimental.proxy_tensor.make_fx` (on fake tensors:
no data, no arithmetic), recording the operations of the loss *and* of its backward
pass (the gradients come from ``torch.autograd.grad`` at capture time) into one graph,
and replays that graph on every later step with the same input shapes: fresh noise each
time (the random ops are in the graph), no Pyro bookkeeping, no autograd tape.
:class:`CompiledFunction` does the same for a function evaluated without gradients
(``log_likelihood``'s importance weights). The Pyro model, guide and ELBO stay the
source of truth: the graph is what they computed, and it is checked against them.

Guarantees:

- **Checked when built.** The graph and the eager ELBO are run from the same RNG
  state; their loss and every gradient must agree (relative 1e-5), or that input shape
  runs eagerly, with a warning that says why.
- **Refuses what it cannot replay.** Python control flow on tensor values (``.item()``,
  ``if tensor > 0``) raises while capturing; that shape then runs eagerly.
- **Eager where a graph would be wrong.** Inside any Pyro handler (the KL warm-up's
  :class:`~pyro_vae.training.LatentScale`, a user's ``poutine.scale``), under Pyro
  validation, with gradients off, for an owner that is not a ``torch.nn.Module``, and
  for estimators not known to be static (:class:`~pyro_vae.estimators.FreeBitsELBO`
  switches on a KL value), the ELBO runs eagerly as it always did.
- **Same numbers.** The graph holds the very operations autograd ran, so losses and
  gradients equal the eager ones (bit for bit on CPU in the tests), and runs resume
  exactly.

Costs, measured here: the first capture in a process imports torch's tracing stack
(``torch._dynamo``, sympy: about 1.5 s and 150 MB, once); each graph then takes about
0.2 s to capture and check (mc, batch 128). A training epoch has at most two graphs:
the full batch and the last, smaller one. Graphs are kept per module, so a later
``fit`` of the same VAE reuses them.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample
from torch import nn

from .estimators import (
    ClosedFormKL_ELBO,
    DReGELBO,
    ImportanceWeightedELBO,
    PenaltyObjective,
    StickingTheLandingELBO,
)
from .model import param_store_registration

#: relative agreement of the graph with the eager ELBO demanded when it is built
TOLERANCE = 1e-5

#: graphs by module, then by estimator and input signature: a second ``fit`` of the same
#: VAE (more epochs, a benchmark's repeats) reuses them; they go with the module
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class NotCompilable(Exception):
    """The loss cannot be captured as a static graph (the message says why)."""


def reparameterized_trace_elbo(model_trace, guide_trace) -> torch.Tensor:
    """One particle of ``Trace_ELBO`` for a reparameterized guide, without host syncs.

    ``sum log p(x, z) - sum log q(z|x)`` over the traces' sample sites (scaled by the data
    plate), exactly ``Trace_ELBO._differentiable_loss_particle``'s surrogate, whose
    value then equals its ELBO; Pyro's version also converts the value to a float
    (``.item()``), which a captured graph cannot replay.
    """
    value = 0.0
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
    return value


def traceable_loss(elbo: ELBO) -> Callable | None:
    """``(model, guide, *args, **kwargs) -> loss``: the ELBO's differentiable loss as
    tensor operations only, or ``None`` for an estimator not known to be static."""
    kind = type(elbo)
    if kind in (Trace_ELBO, ClosedFormKL_ELBO):
        if kind is ClosedFormKL_ELBO:
            particle = elbo.differentiable_elbo_particle
        else:
            particle = reparameterized_trace_elbo

        def loss(model, guide, *args, **kwargs):
            total = 0.0
            for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
                total = total - particle(model_trace, guide_trace) / elbo.num_particles
            return total

        return loss
    if kind in (ImportanceWeightedELBO, StickingTheLandingELBO, DReGELBO, PenaltyObjective):
        return elbo.differentiable_loss
    return None


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
    """A captured graph for one input signature: the ``torch.fx`` module (``module.code``
    shows it) and the plain function that replays it."""

    def __init__(self, module, grad_index: list[int]) -> None:
        self.module = module
        self.replay = replay_function(module)
        self.grad_index = grad_index  # which trainable parameters receive a gradient


def _direct(target: Any) -> Any:
    """An ATen operator's C++ entry point. ``OpOverload.__call__`` is a Python frame
    around it (``return self._op(*args, **kwargs)``) that costs 1.5 us per call here, a
    graph makes about 150 calls a step; other callables are kept as they are."""
    if isinstance(target, torch._ops.OpOverload) and callable(getattr(target, "_op", None)):
        return target._op
    return target


def replay_function(module: torch.fx.GraphModule) -> Callable:
    """``module``'s graph as one Python function: each operator called directly, each
    value released after its last use (as torch.fx's own code does)."""
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
            lines.append(f"v{index} = {constant(_direct(node.target))}({', '.join(arguments)})")
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
    exec(compile(code, "<pyro_vae.compiled replay>", "exec"), bound, scope)
    return scope["replay"]


class _Captured:
    """Graphs of ``function(owner, *args)``, one per input signature, checked when built.

    Subclasses say what the graph returns (:meth:`_joint`) and how it is checked
    against the eager function (:meth:`_check`).
    """

    #: what the graph computes, for the fallback warning
    what = "the function"

    def __init__(self, owner: nn.Module, identity: Any) -> None:
        self.owner = owner
        self._identity = identity
        # an owner that is not a module (functional_call cannot swap its tensors) runs eagerly
        self._swappable = isinstance(owner, nn.Module)
        self._graphs: dict[Any, _Graph | None] = {}
        if self._swappable:
            self._graphs = _GRAPHS.setdefault(owner, {})
        self.fallbacks: dict[Any, str] = {}  # input signature -> why it runs eagerly
        self.capture_seconds = 0.0  # time spent capturing and checking graphs
        self._params: list[nn.Parameter] | None = None
        self._frozen: list[nn.Parameter] | None = None

    def _usable(self) -> bool:
        return self._swappable and not _PYRO_STACK and not is_validation_enabled()

    # ------------------------------------------------------------------ inputs
    def _trainable(self) -> list[nn.Parameter]:
        # the Parameter objects stay for the module's life (load_state_dict and .to()
        # write into them); buffers may be replaced (.to()), so they are read per call
        if self._params is None:
            self._params = [p for p in self.owner.parameters() if p.requires_grad]
        return self._params

    def _tensors(self) -> list[torch.Tensor]:
        """Trainable parameters first, then the rest (frozen parameters, buffers)."""
        if self._frozen is None:
            self._frozen = [p for p in self.owner.parameters() if not p.requires_grad]
        return [*self._trainable(), *self._frozen, *self.owner.buffers()]

    def _names(self) -> list[str]:
        """The names of :meth:`_tensors`, in its order."""
        named = [*self.owner.named_parameters(), *self.owner.named_buffers()]
        by_id = {id(tensor): name for name, tensor in named}
        return [by_id[id(tensor)] for tensor in self._tensors()]

    def _run(self, graph: _Graph, args: tuple):
        return graph.replay(*[t.detach() for t in self._tensors()], *args)

    # ------------------------------------------------------------------ graphs
    def _graph_for(self, args: tuple, kwargs: dict) -> _Graph | None:
        key = (
            self._identity,
            tuple(
                (a.shape, a.dtype, a.device, a.requires_grad) if torch.is_tensor(a) else a
                for a in args
            ),
            tuple(sorted(kwargs.items())),
            self.owner.training,
        )
        if key not in self._graphs:
            started = time.perf_counter()
            try:
                self._graphs[key] = self._capture(args, kwargs)
            except NotCompilable as reason:
                self._graphs[key] = None
                self.fallbacks[key] = str(reason)
                warnings.warn(
                    f"pyro-vae: {self.what} runs eagerly for inputs {_describe(args)}: {reason}",
                    stacklevel=4,
                )
            self.capture_seconds += time.perf_counter() - started
        return self._graphs[key]

    def _capture(self, args: tuple, kwargs: dict) -> _Graph:
        from torch.fx.experimental.proxy_tensor import make_fx

        if any(torch.is_tensor(a) and a.requires_grad for a in args):
            raise NotCompilable("an input requires gradients")
        names = self._names()
        tensors = self._tensors()
        runner = _Runner(self.owner, self._function(kwargs))
        grad_index: list[int] = []

        def joint(*flat):
            swapped = {f"owner.{name}": t for name, t in zip(names, flat)}
            return self._joint(runner, swapped, flat[len(names) :], flat, grad_index)

        trainable = len(self._trainable())
        example = [t.detach().requires_grad_(i < trainable) for i, t in enumerate(tensors)]
        devices = [a.device for a in args if torch.is_tensor(a) and a.device.type == "cuda"]
        with (
            torch.random.fork_rng(devices=devices),
            param_store_registration(False),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # warnings belong to the eager check below
            state = torch.random.get_rng_state()
            try:
                graph = make_fx(joint, tracing_mode="fake")(*example, *args)
            except NotCompilable:
                raise
            except Exception as error:  # what the capture refused, e.g. a .item()
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise NotCompilable(
                    f"the capture failed ({type(error).__name__}: {message[:200]})"
                ) from None
            graph.graph.eliminate_dead_code()  # e.g. the plates' unused index tensors
            self._schedule(graph)
            graph.recompile()
            captured = _Graph(graph, list(grad_index))
            torch.random.set_rng_state(state)
            outputs = self._run(captured, args)
            torch.random.set_rng_state(state)
            self._check(captured, outputs, args, kwargs)
        return captured

    def _function(self, kwargs: dict) -> Callable:
        raise NotImplementedError

    def _joint(self, runner, swapped, args, flat, grad_index):
        raise NotImplementedError

    def _schedule(self, module: torch.fx.GraphModule) -> None:
        """Reorder the captured graph's operations, if that helps (in place)."""

    def _check(self, captured: _Graph, outputs, args: tuple, kwargs: dict) -> None:
        raise NotImplementedError


class CompiledLoss(_Captured):
    """``elbo``'s loss and gradients for ``owner.model`` / ``owner.guide``, from a graph.

    ``loss_and_grads(*args, **kwargs)`` does what ``elbo.differentiable_loss(model,
    guide, *args, **kwargs).backward()`` does (gradients accumulate into the
    parameters' ``.grad``) and returns the loss as a float. Tensor ``args`` may vary
    in value; their shapes, dtypes and devices, the other arguments and
    ``owner.training`` select the graph. With ``enabled=False`` it is the eager ELBO.
    """

    what = "the loss"

    def __init__(
        self,
        elbo: ELBO,
        owner: nn.Module,
        model: str = "model",
        guide: str = "guide",
        enabled: bool = True,
    ) -> None:
        names = (model, guide)
        super().__init__(owner, (type(elbo), repr(sorted(vars(elbo).items())), names))
        self.elbo = elbo
        self.names = names
        self.loss_fn = traceable_loss(elbo) if enabled else None

    def loss_and_grads(self, *args, **kwargs) -> float:
        graph = self._graph_for(args, kwargs) if self._usable() else None
        if graph is None:
            return self._eager(args, kwargs)
        params = self._trainable()
        outputs = self._run(graph, args)
        for index, grad in zip(graph.grad_index, outputs[2:]):
            param = params[index]
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)
        self.grad_sum = outputs[1].item()
        return outputs[0].item()

    #: the sum of all entries of the gradients the last graph replay added (finite if
    #: they all are, barring overflow), computed as each gradient is produced, while
    #: it is still in cache; ``None`` after an eager step
    grad_sum: float | None = None

    def _eager(self, args, kwargs) -> float:
        self.grad_sum = None
        model, guide = (getattr(self.owner, name) for name in self.names)
        loss = self.elbo.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    def _usable(self) -> bool:
        return self.loss_fn is not None and torch.is_grad_enabled() and super()._usable()

    def _function(self, kwargs: dict) -> Callable:
        loss_fn, (model, guide) = self.loss_fn, self.names

        def loss(owner, *args):
            return loss_fn(getattr(owner, model), getattr(owner, guide), *args, **kwargs)

        return loss

    def _joint(self, runner, swapped, args, flat, grad_index):
        loss = torch.func.functional_call(runner, swapped, args)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise NotCompilable("the loss is not a scalar tensor")
        grads = torch.autograd.grad(loss, flat[: len(self._trainable())], allow_unused=True)
        grad_index[:] = [i for i, g in enumerate(grads) if g is not None]
        used = [grads[i] for i in grad_index]
        grad_sum = torch.stack([g.sum() for g in used]).sum() if used else loss.new_zeros(())
        return (loss.detach(), grad_sum, *used)

    def _schedule(self, module: torch.fx.GraphModule) -> None:
        """Sum each gradient right after the operation that produces it."""
        output = next(node for node in module.graph.nodes if node.op == "output")
        for grad in output.args[0][2:]:
            for user in list(grad.users):
                if user.target is torch.ops.aten.sum.default and len(user.all_input_nodes) == 1:
                    grad.append(user)

    def _check(self, captured: _Graph, outputs, args: tuple, kwargs: dict) -> None:
        """The graph's loss and gradients against the eager ELBO's, same noise."""
        params = self._trainable()
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            loss = self._eager(args, kwargs)
            eager = {i: p.grad for i, p in enumerate(params)}
        finally:
            for p, grad in zip(params, saved):
                p.grad = grad
        if not math.isclose(float(outputs[0]), loss, rel_tol=TOLERANCE, abs_tol=1e-6):
            raise NotCompilable(f"the graph's loss {float(outputs[0])!r} is not the ELBO's {loss}")
        graph_grads = dict(zip(captured.grad_index, outputs[2:]))
        for i, expected in eager.items():
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
    weights through one. Checked against ``function`` when captured, like
    :class:`CompiledLoss`; eager under a Pyro handler or Pyro validation.
    """

    def __init__(self, function: Callable, owner: nn.Module) -> None:
        super().__init__(owner, function)
        self.function = function
        self.what = getattr(function, "__name__", "the function")

    def __call__(self, *args) -> torch.Tensor:
        graph = self._graph_for(args, {}) if self._usable() else None
        if graph is None:
            with torch.no_grad():
                return self.function(self.owner, *args)
        return self._run(graph, args)[0]

    def _function(self, kwargs: dict) -> Callable:
        return self.function

    def _joint(self, runner, swapped, args, flat, grad_index):
        with torch.no_grad():
            output = torch.func.functional_call(runner, swapped, args)
        if not torch.is_tensor(output):
            raise NotCompilable("the function does not return a tensor")
        return (output,)

    def _check(self, captured: _Graph, outputs, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            expected = self.function(self.owner, *args)
        if expected.shape != outputs[0].shape or not _close(outputs[0], expected):
            raise NotCompilable(f"the graph's values differ from {self.what}'s")


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return torch.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE * scale + 1e-12)


def _describe(args: tuple) -> str:
    return ", ".join(
        f"{tuple(a.shape)} {a.dtype}".replace("torch.", "") if torch.is_tensor(a) else repr(a)
        for a in args
    )
