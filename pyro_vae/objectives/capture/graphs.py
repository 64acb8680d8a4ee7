"""One graph: captured on fake tensors, replayed, checked against the eager function;
and the cache of a model's graphs.

:func:`capture_graph` records a function of the module's tensors under ``make_fx`` (no
data, no arithmetic) and rewrites it (:mod:`~pyro_vae.objectives.capture.codegen`);
:func:`run_checked` runs a new graph as a call's result and compares it with the eager
function from the same RNG state and buffer values, leaving RNG and buffers as one call
would. :class:`GraphCache` holds a model's graphs and counts the calls made on it: it
lives on the model, so a second ``fit`` of the same model reuses its graphs, and nothing
of it outlives the model or is shared with another.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pyro_vae import compat
from pyro_vae.compat import NotCompilable
from pyro_vae.models.protocol import private_param_store
from pyro_vae.models.vae import param_store_registration
from pyro_vae.objectives.capture.codegen import drop_identities, replay_function, reuse_buffers
from pyro_vae.objectives.capture.keys import ModuleState

__all__ = ["GraphCache", "capture_graph", "run_checked"]

#: relative agreement of the graph with the eager ELBO demanded when it is built or reused
TOLERANCE = 1e-5
#: graphs kept per module (least recently used dropped first)
MAX_GRAPHS = 32


class GraphCache:
    """The graphs captured from one model, by key (``None``: that key runs eagerly), and
    the calls made on it, eager or replayed, by work (the loss, or a function): what the
    auto policy counts (:func:`~pyro_vae.objectives.capture.policy.capture_pays`).

    :meth:`of` keeps one on the model itself: every
    :class:`~pyro_vae.objectives.capture.compiled.CompiledLoss` and
    :class:`~pyro_vae.objectives.capture.compiled.CompiledFunction` of the same model
    shares it, and it goes with the model. A
    copy or a pickle of the model starts with an empty one (graphs hold code made for the
    original's tensors).
    """

    #: the attribute of a model that holds its cache
    ATTRIBUTE = "_pyro_vae_graphs"

    def __init__(self) -> None:
        self.graphs: OrderedDict[Any, Graph | None] = OrderedDict()
        self.calls: dict[Any, int] = {}

    @classmethod
    def of(cls, owner: nn.Module) -> GraphCache:
        """``owner``'s cache, made empty on first use."""
        cache = vars(owner).get(cls.ATTRIBUTE)
        if not isinstance(cache, GraphCache):
            cache = vars(owner)[cls.ATTRIBUTE] = cls()
        return cache

    def __reduce__(self) -> tuple:
        return (GraphCache, ())

    def count(self, work: Any) -> None:
        self.calls[work] = self.calls.get(work, 0) + 1

    def ready(self, prefix: Any) -> int:
        """Graphs ready for keys that start with ``prefix`` (any input shapes)."""
        return sum(1 for key, g in self.graphs.items() if g is not None and key[0] == prefix)

    def add(self, key: Any, graph: Graph) -> None:
        self.graphs[key] = graph
        while len(self.graphs) > MAX_GRAPHS:  # the least recently captured goes first
            self.graphs.popitem(last=False)


class Runner(nn.Module):
    """``function(owner, *args)`` as a module, so that functional_call can swap the
    owner's parameters and buffers for the graph's inputs."""

    def __init__(self, owner: nn.Module, function: Callable) -> None:
        super().__init__()
        self.owner = owner
        self.function = function

    def forward(self, *args):
        return self.function(self.owner, *args)


class Graph:
    """A captured graph: the ``torch.fx`` module (``module.code`` shows it) and the plain
    function that replays it."""

    def __init__(self, module: torch.fx.GraphModule, grad_index: list[int]) -> None:
        self.module = module
        self.replay = replay_function(module)
        self.grad_index = grad_index  # which trainable parameters receive a gradient

    def run(self, state: ModuleState, args: tuple) -> tuple:
        return self.replay(*[t.detach() for t in state.tensors], *args)


#: ``joint(runner, swapped, args, trainable, grad_index)``: what a graph records, from the
#: runner, its tensors by name, the inputs, the trainable tensors; fills ``grad_index``
Joint = Callable[[Runner, dict, tuple, tuple, list], tuple]


def capture_graph(
    owner: nn.Module,
    function: Callable,
    joint: Joint,
    state: ModuleState,
    args: tuple,
    schedule: Callable[[torch.fx.GraphModule], None],
) -> Graph:
    """Record ``joint`` of ``function(owner, *args)`` on fake tensors, rewrite it
    (dead code, :func:`~pyro_vae.objectives.capture.codegen.drop_identities`,
    :func:`~pyro_vae.objectives.capture.codegen.reuse_buffers`, then ``schedule``), and
    leave the RNG as it was. Raises :class:`~pyro_vae.compat.NotCompilable` with what
    the capture refused."""
    if any(torch.is_tensor(a) and a.requires_grad for a in args):
        raise NotCompilable("an input requires gradients")
    runner = Runner(owner, function)
    names = [f"owner.{name}" for name in state.names]
    grad_index: list[int] = []

    def traced(*flat):
        swapped, inputs = dict(zip(names, flat)), flat[len(names) :]
        return joint(runner, swapped, inputs, flat[: state.trainable], grad_index)

    example = [t.detach().requires_grad_(i < state.trainable) for i, t in enumerate(state.tensors)]
    devices = rng_devices(args)
    rng = get_rng(devices)
    try:
        with (
            param_store_registration(owner, False),
            private_param_store(),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # warnings belong to the eager check
            module = compat.make_fx_fake(traced)(*example, *args)
    except NotCompilable:
        raise
    except Exception as error:  # what the capture refused, e.g. a .item()
        raise _refused(error) from None
    finally:
        set_rng(rng, devices)
    module.graph.eliminate_dead_code()  # e.g. the plates' unused index tensors
    drop_identities(module.graph)
    reuse_buffers(module.graph)
    schedule(module)
    module.recompile()
    return Graph(module, list(grad_index))


def _refused(error: Exception) -> NotCompilable:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "FakeTensor" in message:
        return NotCompilable(
            "the program uses a tensor that is neither a parameter nor a buffer of "
            "the module (keep tensors on the module with register_buffer)"
        )
    return NotCompilable(f"the capture failed ({type(error).__name__}: {message[:200]})")


def run_checked(
    owner: nn.Module,
    graph: Graph,
    state: ModuleState,
    args: tuple,
    check: Callable[[tuple], None],
) -> tuple:
    """Run ``graph`` (of ``owner``) as this call's result, and ``check`` its outputs
    against the eager function from the same RNG state and buffers; afterwards buffers
    and RNG are as after one call. Raises :class:`~pyro_vae.compat.NotCompilable`, with
    everything as before the call, if the two disagree."""
    devices = rng_devices(args)
    rng = get_rng(devices)
    buffers = [b.detach().clone() for b in state.buffers]
    outputs = graph.run(state, args)
    graph_rng = get_rng(devices)
    graph_buffers = [b.detach().clone() for b in state.buffers]
    set_rng(rng, devices)
    restore(state.buffers, buffers)
    try:
        with param_store_registration(owner, False), private_param_store():
            check(outputs)
        if any(not close(g, b) for g, b in zip(graph_buffers, state.buffers)):
            raise NotCompilable("the graph updates the buffers differently from the ELBO")
        if any(not torch.equal(a, b) for a, b in zip(graph_rng, get_rng(devices))):
            raise NotCompilable("the graph draws random numbers differently from the ELBO")
    except BaseException:
        set_rng(rng, devices)
        restore(state.buffers, buffers)
        raise
    return outputs


def rng_devices(args: tuple) -> list[torch.device]:
    return sorted(
        {a.device for a in args if torch.is_tensor(a) and a.device.type == "cuda"}, key=str
    )


def get_rng(devices: list[torch.device]) -> list[torch.Tensor]:
    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in devices]


def set_rng(states: list[torch.Tensor], devices: list[torch.device]) -> None:
    torch.set_rng_state(states[0])
    for state, device in zip(states[1:], devices):
        torch.cuda.set_rng_state(state, device)


def restore(buffers: tuple[torch.Tensor, ...], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(buffers, values):
            buffer.copy_(value)


def same_number(got: float, expected: float) -> bool:
    """Equal within :data:`TOLERANCE`, or the same non-finite value (a NaN step is
    reported by the trainer; it does not make the graph wrong)."""
    if not (math.isfinite(got) and math.isfinite(expected)):
        return got == expected or (math.isnan(got) and math.isnan(expected))
    return math.isclose(got, expected, rel_tol=TOLERANCE, abs_tol=1e-6)


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal within :data:`TOLERANCE` of the largest finite entry (the same NaNs)."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    if not got.is_floating_point():
        return torch.equal(got, expected)
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return torch.allclose(
        got, expected, rtol=TOLERANCE, atol=TOLERANCE * scale + 1e-12, equal_nan=True
    )
