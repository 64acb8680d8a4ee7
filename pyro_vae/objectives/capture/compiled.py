"""The captured loss and function: :class:`CompiledLoss` (a training step's loss and
gradients) and :class:`CompiledFunction` (a function evaluated without gradients), each
replaying graphs of the owner keyed by all they depend on, checked when built, and falling
back to the eager function, with one warning per reason, wherever a graph would be wrong
(the package's docstring, :mod:`pyro_vae.objectives.capture`, lists the guarantees).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import am_i_wrapped
from torch import nn

from pyro_vae.compat import NotCompilable
from pyro_vae.models.protocol import scaled
from pyro_vae.objectives.capture.dispatch import traceable_loss
from pyro_vae.objectives.capture.graphs import (
    Graph,
    GraphCache,
    Runner,
    capture_graph,
    close,
    run_checked,
    same_number,
)
from pyro_vae.objectives.capture.keys import ModuleState, OwnerKeys, value_key
from pyro_vae.objectives.registry import Objective

__all__ = ["CompiledFunction", "CompiledLoss", "largest", "passes_fast", "square_sum"]

_MISSING = object()


def largest(tensor: torch.Tensor) -> torch.Tensor:
    """``max |tensor|`` in one pass over it (NaN if it holds a NaN)."""
    low, high = torch.aminmax(tensor)
    return torch.maximum(high, -low)


def square_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the squares of every entry of ``tensors`` (one BLAS dot per tensor):
    at least the square of the largest entry in magnitude (a sum of non-negative terms
    rounds to no less than any of them), NaN or infinite where any entry is, and
    infinite where an entry's square overflows. The finite check's fast bound
    (:func:`passes_fast`): about half the time of a :func:`largest` pass over each
    tensor, which is read only where the bound does not settle the check."""
    flat = [t.reshape(-1) for t in tensors]
    return torch.stack([torch.dot(f, f) for f in flat]).sum()


def passes_fast(square_sum: float, limit: float) -> bool:
    """Whether ``square_sum`` (:func:`square_sum` of the gradients) proves every entry
    finite and no larger than ``limit`` in magnitude: its square root bounds the largest
    entry to within float rounding (a relative 2**-24), so it must be finite and below
    ``limit`` by more than that. ``False`` settles nothing: the largest entry decides."""
    return math.isfinite(square_sum) and math.sqrt(square_sum) <= limit * (1 - 2.0**-23)


def _autocast_enabled() -> bool:
    return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))


class _Captured:
    """Graphs of ``function(owner, *args)``, keyed by all they depend on
    (:class:`~pyro_vae.objectives.capture.keys.OwnerKeys`), captured and checked when
    built (:func:`~pyro_vae.objectives.capture.graphs.capture_graph`,
    :func:`~pyro_vae.objectives.capture.graphs.run_checked`). Subclasses say what the
    graph returns (:meth:`_joint`) and how it is checked against the eager function
    (:meth:`_check`).

    ``refresh_every_call`` (default) walks the owner on every call to build the key; a
    caller that knows the owner cannot change between its calls (``fit`` within an
    epoch) turns it off and calls ``refresh()`` whenever the owner may have changed.
    ``cache`` holds the graphs and counts the calls: by default the owner's own
    (:meth:`~pyro_vae.objectives.capture.graphs.GraphCache.of`), which
    every compiled loss and function of the owner shares.
    """

    #: what the graph computes, for the fallback warning
    what = "the function"
    #: what calls are counted under (per owner): the loss, or the function
    _work: Any = "loss"

    def __init__(
        self,
        owner: Any,
        enabled: bool = True,
        refresh_every_call: bool = True,
        cache: GraphCache | None = None,
    ) -> None:
        self.owner = owner
        self.enabled = enabled
        self.refresh_every_call = refresh_every_call
        # an owner that is not a module (functional_call cannot swap its tensors) runs eagerly
        self._swappable = isinstance(owner, nn.Module)
        if cache is None:
            cache = GraphCache.of(owner) if self._swappable else GraphCache()
        self.cache = cache
        self.fallbacks: dict[Any, str] = {}  # key -> why it runs eagerly
        self.capture_seconds = 0.0  # time spent capturing and checking graphs
        self._keys = OwnerKeys(owner, self._identity) if self._swappable else None

    @property
    def graphs(self) -> OrderedDict[Any, Graph | None]:
        """The owner's graphs by key (``None``: that key runs eagerly), of every work."""
        return self.cache.graphs

    # ------------------------------------------------------------------ state
    def refresh(self) -> None:
        """Re-read the owner (its structure, flags, parameters) before the next call."""
        if self._keys is not None:
            self._keys.refresh()

    def _read(self) -> OwnerKeys | None:
        """The owner's keys, re-read first where every call refreshes or none was read."""
        keys = self._keys
        if keys is not None and (self.refresh_every_call or keys.state is None):
            keys.refresh()
        return keys

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

    def calls(self) -> int:
        """Calls made on the owner for the same work (any estimator's loss and gradients;
        or this function), eager or replayed, as its cache counted them: how much of it
        there has been, for the auto policy
        (:func:`~pyro_vae.objectives.capture.policy.capture_pays`)."""
        return self.cache.calls.get(self._work, 0) if self._swappable else 0

    def _count(self) -> None:
        if self._swappable:
            self.cache.count(self._work)

    def cached_graphs(self) -> int:
        """Graphs ready in the cache for the owner as it is now (any input shapes)."""
        keys = self._read()
        return 0 if keys is None else self.cache.ready(keys.prefix)

    # ------------------------------------------------------------------ running
    def _outputs(self, args: tuple, kwargs: dict):
        """``(graph, state, outputs)`` of this call from a graph, or ``None`` (eager)."""
        keys = self._read() if self._usable() else None
        state = None if keys is None else self._readable_state(keys, args)
        key = None if keys is None or state is None else self._key(keys, args, kwargs)
        if state is None or key is None:
            return None
        graph = self.cache.graphs.get(key, _MISSING)
        if graph is _MISSING:
            return self._capture(key, state, args, kwargs)
        if not isinstance(graph, Graph):  # None: this key runs eagerly
            return None
        return graph, state, graph.run(state, args)

    def _readable_state(self, keys: OwnerKeys, args: tuple) -> ModuleState | None:
        """The owner as a graph would take it now, or ``None`` where it runs eagerly."""
        state = keys.state
        if state is None:  # (read just before)
            return None
        if state.reason is not None:
            self._note_fallback(("state", state.reason), state.reason, args)
            if state.reason.startswith("the module has uninitialized"):
                keys.state = None  # its first call initializes it: look again next time
            return None
        return state

    def _key(self, keys: OwnerKeys, args: tuple, kwargs: dict) -> Any:
        """The graph's key for this call, or ``None`` (eager) if it cannot be hashed."""
        try:
            key = keys.call_key(args, kwargs)
        except TypeError:
            self._note_fallback("unhashable", "an argument or attribute is not hashable", args)
            return None
        return key

    def _capture(self, key: Any, state: ModuleState, args: tuple, kwargs: dict):
        """Capture, run and check a graph for ``key``: ``(graph, state, outputs)``, or
        ``None`` with the key marked eager if the capture or the check refuses it."""
        started = time.perf_counter()
        try:
            function = self._function(kwargs)
            graph = capture_graph(self.owner, function, self._joint, state, args, self._schedule)

            def check(outputs: tuple) -> None:
                self._check(graph, state, outputs, args, kwargs)

            outputs = run_checked(self.owner, graph, state, args, check)
        except NotCompilable as reason:
            self.cache.graphs[key] = None
            self._note_fallback(key, str(reason), args)
            return None
        finally:
            self.capture_seconds += time.perf_counter() - started
        self.cache.add(key, graph)
        return graph, state, outputs

    def _note_fallback(self, key: Any, reason: str, args: tuple) -> None:
        if key in self.fallbacks:
            return
        self.fallbacks[key] = reason
        warnings.warn(  # (the caller of loss_and_grads, or of the function)
            f"pyro-vae: {self.what} runs eagerly for inputs {_describe(args)}: {reason}",
            stacklevel=6,
        )

    def _function(self, kwargs: dict) -> Callable:
        raise NotImplementedError

    def _joint(
        self, runner: Runner, swapped: dict, args: tuple, trainable: tuple, grad_index: list
    ) -> tuple:
        raise NotImplementedError

    def _schedule(self, module: torch.fx.GraphModule) -> None:
        """Reorder the captured graph's operations, if that helps (in place)."""

    def _check(self, graph: Graph, state: ModuleState, outputs, args: tuple, kwargs: dict):
        raise NotImplementedError


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
        cache: GraphCache | None = None,
    ) -> None:
        super().__init__(owner, enabled, refresh_every_call, cache)
        self.elbo = elbo
        self.names = (model, guide)
        self.loss_fn, self.eager_reason = traceable_loss(elbo, capture)

    #: the sum of the squares of the gradient entries the last graph replay added
    #: (:func:`square_sum`, a bound on the largest for the trainer's finite check),
    #: computed as each gradient is produced, while it is still in cache; ``None`` after
    #: an eager step
    grad_square_sum: float | None = None

    def _identity(self) -> Any:
        settings = tuple(sorted((k, value_key(v)) for k, v in vars(self.elbo).items()))
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
        self.grad_square_sum = outputs[1].item()
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
        self.grad_square_sum = None
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
        squares = square_sum(used) if used else loss.new_zeros(())
        return (loss.detach(), squares, *used)

    def _schedule(self, module: torch.fx.GraphModule) -> None:
        """Reduce each gradient (its flattening and its dot with itself) right after the
        operation producing it, while it is still in cache."""
        output = next(node for node in module.graph.nodes if node.op == "output")
        grads = set(output.args[0][2:])
        for dot in [n for n in module.graph.nodes if n.target is torch.ops.aten.dot.default]:
            chain, node = [dot], dot.args[0]
            while node not in grads and node.op == "call_function" and len(node.users) == 1:
                chain.append(node)  # (the flattening: a view, or a copy and a view)
                node = node.args[0]
            if node in grads:
                at = node
                for step in reversed(chain):
                    at.append(step)
                    at = step

    def _check(self, graph: Graph, state: ModuleState, outputs, args: tuple, kwargs: dict):
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
        if not same_number(float(outputs[0]), loss):
            raise NotCompilable(f"the graph's loss {float(outputs[0])!r} is not the ELBO's {loss}")
        graph_grads = dict(zip(graph.grad_index, outputs[2:]))
        for i, expected in enumerate(eager):
            got = graph_grads.get(i)
            if expected is None and got is None:
                continue
            if expected is None or got is None:
                raise NotCompilable("the graph and the ELBO disagree on which parameters move")
            if not close(got, expected):
                raise NotCompilable("the graph's gradients differ from the ELBO's")


class CompiledFunction(_Captured):
    """``function(owner, *args)`` without gradients (tensor in, tensor out), from a graph.

    For evaluation: :func:`pyro_vae.analysis.evaluation.log_likelihood` draws its importance
    weights through one. Checked against ``function`` like :class:`CompiledLoss`.
    """

    def __init__(
        self,
        function: Callable,
        owner: Any,
        enabled: bool = True,
        refresh_every_call: bool = True,
        cache: GraphCache | None = None,
    ) -> None:
        super().__init__(owner, enabled, refresh_every_call, cache)
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

    def _check(self, graph: Graph, state: ModuleState, outputs, args: tuple, kwargs: dict):
        with torch.no_grad():
            expected = self.function(self.owner, *args)
        if expected.shape != outputs[0].shape or not close(outputs[0], expected):
            raise NotCompilable(f"the graph's values differ from {self.what}'s")


def _describe(args: tuple) -> str:
    return ", ".join(
        f"{tuple(a.shape)} {a.dtype}".replace("torch.", "") if torch.is_tensor(a) else repr(a)
        for a in args
    )
