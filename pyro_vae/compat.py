"""Every private or experimental torch and Pyro name pyro-vae touches, fenced in one place.

Each function here states the assumption it makes about a library's internals and what
happens when the assumption fails: the fast path it serves falls back to the public,
slower way, loudly where the numbers could otherwise change. ``tests/test_compat.py``
checks each assumption against the installed versions, so a torch or Pyro upgrade that
breaks one fails there, by name, instead of somewhere downstream.

Names used, and why no public equivalent serves:

- ``torch.fx.experimental.proxy_tensor.make_fx`` (experimental): records a function's
  ATen operations, forward and backward, on fake tensors; the captured training step
  of :mod:`pyro_vae.objectives.capture`. ``torch.compile`` breaks its graph on Pyro's messengers.
- ``torch._ops.OpOverload`` and its ``_op`` attribute (private): the C++ entry point
  of an ATen operator, called directly by replayed graphs (``OpOverload.__call__``
  adds a Python frame per operator call).
- ``pyro.infer.ELBO._get_traces`` (private): the (model trace, guide trace) pairs of a
  ``Trace_ELBO`` or ``TraceMeanField_ELBO``, vectorized particles included, from which
  the captured loss is written without the ``.item()`` calls of Pyro's loss methods.
- ``torch.Tensor._version`` (private): the in-place version counter, so that a cached
  check of a data tensor is redone after an in-place change.
- ``torch.nn.Module._forward_hooks`` and friends (private): hooks that change a
  module's output are part of what a captured graph baked in.
- A hand-built ``pyro.poutine.Trace`` (public class, but the message keys that
  ``poutine.replay`` reads from its nodes are an implicit contract): DReG evaluates the
  model at leaf copies of the guide's samples while keeping the sites latent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


class NotCompilable(Exception):
    """The loss cannot be captured as a static graph (the message says why)."""


# ---------------------------------------------------------------------- torch.fx
def make_fx_fake(function: Callable) -> Callable:
    """``make_fx(function, tracing_mode="fake")``: a tracer recording ATen operations.

    Assumption: ``torch.fx.experimental.proxy_tensor.make_fx`` exists and accepts
    ``tracing_mode="fake"``. Fallback: :class:`NotCompilable` (the caller runs eagerly).
    """
    try:
        from torch.fx.experimental.proxy_tensor import make_fx
    except ImportError as error:  # pragma: no cover - depends on the torch version
        raise NotCompilable(f"torch has no make_fx ({error})") from None
    return make_fx(function, tracing_mode="fake")


def tracing_stack_loaded() -> bool:
    """Whether the one-time cost of the first capture (importing ``torch._dynamo`` and
    sympy) has been paid in this process already."""
    return "torch._dynamo" in sys.modules


def _overload_type() -> type | None:
    return getattr(getattr(torch, "_ops", None), "OpOverload", None)


def operator_entry(target: Any) -> Any:
    """An ATen operator's C++ entry point, or ``target`` itself.

    Assumption: ``OpOverload.__call__`` ends in ``self._op(*args, **kwargs)``, so calling
    ``_op`` computes the same thing without the Python frame (a graph makes one such call
    per operation, on every step). Fallback: the ``OpOverload`` itself, which is
    always correct, only slower.
    """
    overload = _overload_type()
    if overload is not None and isinstance(target, overload):
        entry = getattr(target, "_op", None)
        if callable(entry):
            return entry
    return target


# ---------------------------------------------------------------------- Pyro
def elbo_traces(elbo, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Iterator:
    """The ELBO's (model trace, guide trace) pairs, one per particle or one vectorized.

    Assumption: ``pyro.infer.ELBO._get_traces(model, guide, args, kwargs)`` yields them
    with ``log_prob_sum`` computed at every sample site (``Trace_ELBO`` and
    ``TraceMeanField_ELBO`` do). Fallback: :class:`NotCompilable` (eager ELBO).
    """
    get_traces = getattr(elbo, "_get_traces", None)
    if get_traces is None:  # pragma: no cover - depends on the Pyro version
        raise NotCompilable(f"{type(elbo).__name__} has no _get_traces")
    return get_traces(model, guide, args, kwargs)


# ---------------------------------------------------------------------- tensors and modules
def tensor_version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter, or ``None`` where it cannot be read.

    Assumption: ``Tensor._version`` increases with every in-place change. Fallback:
    ``None``, which callers treat as "unknown": they redo their check every time.
    """
    version = getattr(tensor, "_version", None)
    return version if isinstance(version, int) else None


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
)
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def module_hooks(module: nn.Module) -> tuple:
    """The hooks registered on ``module`` (the callables themselves: a key holding
    them keeps them alive, so an identity is never reused): a captured graph ran them.

    Assumption: ``nn.Module`` keeps its hooks in the dicts named in ``_HOOK_DICTS``.
    Fallback: ``None`` in the place of a dict that is missing; the graph is still checked
    against the eager ELBO when it is first used by each ``fit``.
    """
    return tuple(
        tuple(hooks.values()) if isinstance(hooks, dict) else None
        for hooks in (getattr(module, name, None) for name in _HOOK_DICTS)
    )


def global_module_hooks() -> tuple:
    """The hooks registered for every module (``register_module_forward_hook``, ...)."""
    from torch.nn.modules import module as module_module

    return tuple(
        tuple(hooks.values()) if isinstance(hooks, dict) else None
        for hooks in (getattr(module_module, name, None) for name in _GLOBAL_HOOK_DICTS)
    )


def values_trace(values: dict[str, torch.Tensor]):
    """A trace whose sample sites hold ``values``, for ``poutine.replay``.

    Assumption: ``ReplayMessenger`` reads ``type``, ``is_observed``, ``value`` and
    ``infer`` of a node, and the replayed sites stay latent (``is_observed`` False), so
    that handlers such as the KL warm-up still recognise them. No fallback: the
    assumption is tested, and DReG's value and gradient are tested against exact ones.
    """
    from pyro import poutine

    trace = poutine.Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", is_observed=False, value=value, infer={})
    return trace
