"""A Pyro ELBO's loss and gradients on a VAE, captured once per input shape and replayed.

Pyro builds its traces in Python on every step: messengers, site dictionaries, the
replay of the guide's samples into the model. On this machine that is about 1 ms per
step, 15-25% of a 784-400-50 MLP step at batch 128 on two CPU cores. The tensor work
itself is the same every step. :class:`CompiledLoss` runs the Pyro program and the
ELBO once, under :func:`torch.fx.experimental.proxy_tensor.make_fx`, recording the
operations of the loss *and* of its backward pass (the gradients come from
``torch.autograd.grad`` at capture time) into one graph, and replays that graph on every
later step with the same input shapes: fresh noise each time (the random ops are in the
graph), no Pyro bookkeeping, no autograd tape. The Pyro model, guide and ELBO stay the
source of truth: the graph is what they computed, and it is checked against them.

Guarantees:

- **Checked when built.** The graph and the eager ELBO are run from the same RNG
  state; their loss and every gradient must agree (relative 1e-5), or that input shape
  trains eagerly, with a warning that says why.
- **Refuses what it cannot replay.** Python control flow on tensor values (``.item()``,
  ``if tensor > 0``) raises while capturing; that shape then trains eagerly.
- **Eager where a graph would be wrong.** Inside any Pyro handler (the KL warm-up's
  :class:`~pyro_vae.training.LatentScale`, a user's ``poutine.scale``), under Pyro
  validation, with gradients off, or for estimators not known to be static
  (:class:`~pyro_vae.estimators.FreeBitsELBO` switches on a KL value), the ELBO runs
  eagerly as it always did.
- **Same numbers.** The graph holds the very operations autograd ran, so losses and
  gradients equal the eager ones (bit for bit on CPU in the tests), and runs resume
  exactly.

Capturing costs one eager step and about 50-200 ms per input shape (a training epoch
has at most two: the full batch and the last, smaller one).
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


class _Loss(nn.Module):
    """The module's model and guide under the ELBO, as one module for functional_call."""

    def __init__(self, owner: nn.Module, loss: Callable, model: str, guide: str, kwargs):
        super().__init__()
        self.owner = owner
        self.loss = loss
        self.names = (model, guide)
        self.kwargs = kwargs

    def forward(self, *args):
        model, guide = (getattr(self.owner, name) for name in self.names)
        return self.loss(model, guide, *args, **self.kwargs)


class _Graph:
    """A captured loss-and-gradients graph for one input signature."""

    def __init__(self, graph, grad_index: list[int]) -> None:
        self.graph = graph
        self.grad_index = grad_index  # which trainable parameters receive a gradient


class CompiledLoss:
    """``elbo``'s loss and gradients for ``owner.model`` / ``owner.guide``, from a graph.

    ``loss_and_grads(*args, **kwargs)`` does what ``elbo.differentiable_loss(model,
    guide, *args, **kwargs).backward()`` does (gradients accumulate into the
    parameters' ``.grad``) and returns the loss as a float. Tensor ``args`` may vary
    in value; their shapes, dtypes and devices, the other arguments and
    ``owner.training`` select the graph. With ``enabled=False`` it is the eager ELBO.
    """

    def __init__(
        self,
        elbo: ELBO,
        owner: nn.Module,
        model: str = "model",
        guide: str = "guide",
        enabled: bool = True,
    ) -> None:
        self.elbo = elbo
        self.owner = owner
        self.names = (model, guide)
        self.loss_fn = traceable_loss(elbo) if enabled else None
        self._graphs: dict[Any, _Graph | None] = _GRAPHS.setdefault(owner, {})
        self._estimator = (type(elbo), repr(sorted(vars(elbo).items())), self.names)
        self.fallbacks: dict[Any, str] = {}  # input signature -> why it runs eagerly
        self.capture_seconds = 0.0  # time spent capturing and checking graphs

    # ------------------------------------------------------------------ the step
    def loss_and_grads(self, *args, **kwargs) -> float:
        graph = self._graph_for(args, kwargs) if self._usable() else None
        if graph is None:
            return self._eager(args, kwargs)
        params = self._trainable()
        outputs = graph.graph(*[t.detach() for t in self._tensors()], *args)
        for index, grad in zip(graph.grad_index, outputs[1:]):
            param = params[index]
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)
        return outputs[0].item()

    def _eager(self, args, kwargs) -> float:
        model, guide = (getattr(self.owner, name) for name in self.names)
        loss = self.elbo.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    def _usable(self) -> bool:
        return (
            self.loss_fn is not None
            and not _PYRO_STACK
            and not is_validation_enabled()
            and torch.is_grad_enabled()
        )

    # ------------------------------------------------------------------ graphs
    def _trainable(self) -> list[nn.Parameter]:
        # the Parameter objects stay for the module's life (load_state_dict and .to()
        # write into them); buffers may be replaced (.to()), so they are read per call
        if self._params is None:
            self._params = [p for p in self.owner.parameters() if p.requires_grad]
        return self._params

    _params: list[nn.Parameter] | None = None

    def _named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Trainable parameters first, then the rest (frozen parameters, buffers)."""
        params = list(self.owner.named_parameters())
        trainable = [(n, p) for n, p in params if p.requires_grad]
        frozen = [(n, p) for n, p in params if not p.requires_grad]
        return trainable + frozen + list(self.owner.named_buffers())

    def _tensors(self) -> list[torch.Tensor]:
        if self._frozen is None:
            self._frozen = [p for p in self.owner.parameters() if not p.requires_grad]
        return [*self._trainable(), *self._frozen, *self.owner.buffers()]

    _frozen: list[nn.Parameter] | None = None

    def _graph_for(self, args: tuple, kwargs: dict) -> _Graph | None:
        key = (
            self._estimator,
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
                    f"pyro-vae: the loss runs eagerly for inputs {_describe(args)}: {reason}",
                    stacklevel=3,
                )
            self.capture_seconds += time.perf_counter() - started
        return self._graphs[key]

    def _capture(self, args: tuple, kwargs: dict) -> _Graph:
        from torch.fx.experimental.proxy_tensor import make_fx

        if any(torch.is_tensor(a) and a.requires_grad for a in args):
            raise NotCompilable("an input requires gradients")
        named = self._named_tensors()
        names = [name for name, _ in named]
        trainable = len(self._trainable())
        runner = _Loss(self.owner, self.loss_fn, *self.names, kwargs)
        grad_index: list[int] = []

        def joint(*flat):
            tensors = dict(zip(names, flat[: len(names)]))
            loss = torch.func.functional_call(
                runner, {f"owner.{name}": t for name, t in tensors.items()}, flat[len(names) :]
            )
            if not torch.is_tensor(loss) or loss.dim() != 0:
                raise NotCompilable("the loss is not a scalar tensor")
            inputs = flat[:trainable]
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            grad_index[:] = [i for i, g in enumerate(grads) if g is not None]
            return (loss.detach(), *(grads[i] for i in grad_index))

        example = [t.detach().requires_grad_(i < trainable) for i, (_, t) in enumerate(named)]
        devices = [a.device for a in args if torch.is_tensor(a) and a.device.type == "cuda"]
        with (
            torch.random.fork_rng(devices=devices),
            param_store_registration(False),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # warnings belong to the eager check below
            state = torch.random.get_rng_state()
            try:
                graph = make_fx(joint)(*example, *args)
            except NotCompilable:
                raise
            except Exception as error:  # what the capture refused, e.g. a .item()
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise NotCompilable(
                    f"the capture failed ({type(error).__name__}: {message[:200]})"
                ) from None
            graph.graph.eliminate_dead_code()  # e.g. the plates' unused index tensors
            graph.recompile()
            captured = _Graph(graph, list(grad_index))
            torch.random.set_rng_state(state)
            outputs = graph(*[t.detach() for _, t in named], *args)
            torch.random.set_rng_state(state)
            self._check(captured, outputs, args, kwargs)
        return captured

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
        graph_grads = dict(zip(captured.grad_index, outputs[1:]))
        for i, expected in eager.items():
            got = graph_grads.get(i)
            if expected is None and got is None:
                continue
            if expected is None or got is None:
                raise NotCompilable("the graph and the ELBO disagree on which parameters move")
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            if not torch.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE * scale + 1e-12):
                raise NotCompilable("the graph's gradients differ from the ELBO's")


def _describe(args: tuple) -> str:
    return ", ".join(
        f"{tuple(a.shape)} {a.dtype}".replace("torch.", "") if torch.is_tensor(a) else repr(a)
        for a in args
    )
