"""What a captured graph bakes in: the key of a module's whole structure, and its tensors.

A graph is reused only for the key it was captured under. The key holds every
submodule's type, ``training`` flag, plain attributes (a dropout rate, an activation's
slope) and hooks; every parameter's and buffer's name, shape, dtype, device and
``requires_grad``. Plain attributes are described by value (:func:`value_key`), also
inside containers, plain objects (a hyperparameter namespace) and function closures.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pyro_vae import compat

__all__ = ["ModuleState", "OwnerKeys", "module_state", "value_key"]

_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def value_key(value: Any, depth: int = 0) -> Any:
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
        return (type(value), tuple(value_key(v, inner) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, value_key(v, inner)) for k, v in value.items()))
    if isinstance(value, nn.Module):  # a module kept outside the module tree
        return ("module", id(value))
    if isinstance(value, types.FunctionType):
        cells = tuple(_cell_key(cell, value, inner) for cell in value.__closure__ or ())
        return ("function", value.__code__, value_key(value.__defaults__, inner), cells)
    if isinstance(value, types.MethodType):
        return ("method", value.__func__, id(value.__self__))
    if not isinstance(value, type) and hasattr(value, "__dict__"):
        return ("object", type(value), value_key(vars(value), inner))
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
    return "itself" if contents is function else value_key(contents, depth)


def _attributes(module: nn.Module) -> tuple:
    """A module's plain attributes (not its parameters, buffers, submodules or flags)."""
    return tuple(
        (name, value_key(value))
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


class Hashed:
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
            isinstance(other, Hashed) and other.hash == self.hash and other.value == self.value
        )


class OwnerKeys:
    """The keys of ``owner``'s graphs: its structure, read by :func:`module_state` at each
    ``refresh()`` and hashed once there, with ``identity()`` (what else a graph depends
    on: the estimator and its settings, or the function) and the default dtype; then, per
    call, the inputs' shapes, dtypes and devices (:meth:`call_key`)."""

    def __init__(self, owner: nn.Module, identity: Callable[[], Any]) -> None:
        self.owner = owner
        self.identity = identity
        self.state: ModuleState | None = None  # None: to be read
        self.prefix: Hashed | None = None  # None: nothing can be keyed

    def refresh(self) -> None:
        """Re-read the owner (its structure, flags, parameters)."""
        self.state = state = module_state(self.owner)
        self.prefix = None
        if state.reason is None:
            try:
                self.prefix = Hashed((self.identity(), state.key, torch.get_default_dtype()))
            except TypeError:  # an attribute or setting that cannot be hashed
                self.prefix = None

    def call_key(self, args: tuple, kwargs: dict) -> Any:
        """The key of a call with ``args`` and ``kwargs``; raises ``TypeError`` where
        something in it cannot be hashed."""
        signature = tuple(
            (a.shape, a.dtype, a.device, a.requires_grad) if torch.is_tensor(a) else a for a in args
        )
        key = (self.prefix, signature, tuple(sorted(kwargs.items())))
        if self.prefix is None:
            raise TypeError
        hash(key)
        return key
