"""What a model must offer the tools, and what they find out from its traces.

A model is any object with two Pyro programs over a mini-batch ``x``, as Pyro's VAE
tutorial writes them:

- ``model(x)``: p(x, z), with latent sample sites and at least one observed site
  (``obs=``);
- ``guide(x)``: q(z | x), with one sample site per latent site of the model.

Every sample site lives inside a plate over the data points (``pyro.plate(name,
x.shape[0])``; any name), with its event dimensions declared (``.to_event``), so that
each data point has its own bound. The site names are not fixed: the latent sites are
the guide's sample sites, in the guide's order (for several layers, the order of the
layers), and the observed sites are the model's ``is_observed`` sites. The data's shape
and any flattening are the model's business: the tools pass ``x`` as given.

Mini-batch scaling is the library's, not a keyword the programs must accept: training
wraps both in ``poutine.scale(scale=num_data / batch)``. Parameters are the object's own
(its ``parameters()`` as an ``nn.Module``, or those of its ``nn.Module`` attributes),
never read from Pyro's global param store; the tools run the programs in a private param
store, so that ``pyro.module`` calls of one model never see another model's tensors.

Optional, used when present:

- ``check_data(x, what)``: refuse data the likelihood cannot score (else: finite
  floating-point values, and one trial run of both programs);
- ``analytic_kl_is_exact``: whether ``TraceMeanField_ELBO``'s closed-form KL is the
  model's KL (else: true for one latent site, false for several);
- ``sample(num_samples)``: draws of x from the model, for ``pyro-vae sample``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pyro
import torch
from pyro import poutine
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae.errors import DataError, UserInputError


@runtime_checkable
class PyroModel(Protocol):
    """The model protocol: a Pyro model and an amortized guide over a mini-batch."""

    def model(self, x: torch.Tensor) -> Any: ...

    def guide(self, x: torch.Tensor) -> Any: ...


class ModelError(UserInputError):
    """A model the tools cannot run: the message says what it needs."""


@dataclass(frozen=True)
class ModelSites:
    """The sample sites of a model and guide, found from one trace of each.

    :param latent: the guide's sample sites, in the guide's order.
    :param observed: the model's observed sites.
    :param data_plate: the plate over the data points that holds the observed sites.
    """

    latent: tuple[str, ...]
    observed: tuple[str, ...]
    data_plate: str


def check_protocol(obj: Any) -> None:
    """Refuse, in one line, an object without callable ``model`` and ``guide``."""
    missing = [name for name in ("model", "guide") if not callable(getattr(obj, name, None))]
    if missing:
        raise ModelError(
            f"{type(obj).__name__} has no {' or '.join(missing)} method: a model needs "
            f"model(x) (p(x, z), with an observed site) and guide(x) (q(z|x)), both Pyro "
            f"programs over a mini-batch x"
        )


def modules_of(owner: Any) -> list[nn.Module]:
    """The networks of ``owner``: itself if it is a module, else its module attributes."""
    if isinstance(owner, nn.Module):
        return [owner]
    return [v for v in vars(owner).values() if isinstance(v, nn.Module)]


def parameters_of(owner: Any) -> list[torch.Tensor]:
    """The parameters of ``owner``'s networks, each once, in their modules' order."""
    seen: dict[int, torch.Tensor] = {}
    for module in modules_of(owner):
        for param in module.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


@contextmanager
def private_param_store() -> Iterator[None]:
    """Run Pyro programs in a fresh param store, restored afterwards.

    ``pyro.module(name, net)`` returns the tensors already stored under ``name``: in the
    global store those may be another model's. In a fresh store they are the module's
    own, which is what every tool measures and trains.
    """
    with pyro.get_param_store().scope():
        yield


@contextmanager
def evaluation_mode(*owners: Any) -> Iterator[None]:
    """Put every network of ``owners`` in eval mode, and restore each submodule's own mode.

    Evaluations run in eval mode: dropout off, BatchNorm normalizing with its running
    statistics and leaving them alone. A caller's mixed modes (an encoder training, a
    decoder in eval mode) come back exactly as they were, even if the body raises. The
    programs run in a private param store (:func:`~pyro_vae.models.protocol.private_param_store`):
    a model's ``pyro.module`` calls see its own tensors and leave the global store alone.
    """
    modes = [(m, m.training) for owner in owners for o in modules_of(owner) for m in o.modules()]
    for module, _ in modes:
        module.training = False
    try:
        with private_param_store():
            yield
    finally:
        for module, training in modes:
            module.training = training


def scaled(program: Callable[..., Any], scale: float) -> Callable[..., Any]:
    """``program`` with every log-density multiplied by ``scale`` (mini-batch scaling)."""
    return program if scale == 1.0 else poutine.scale(program, scale=scale)


def model_device(owner: Any) -> torch.device | None:
    """The device of ``owner``'s networks: that of the first parameter (else buffer) of its
    modules, ``None`` for a model with no tensors of its own (parameters in Pyro's store)."""
    for module in modules_of(owner):
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return None


def on_model_device(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``x`` on ``model``'s device (:func:`model_device`); as given when it is there already
    or the model has no tensors of its own."""
    device = model_device(model)
    return x if device is None or x.device == device else x.to(device)


def as_batch(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the model takes it: on the model's device (:func:`model_device`), then
    through the model's own ``flatten`` where it has one (which refuses a shape that does
    not fit, in one line), else as given. Every tool passes its data through this, so
    that images read on the CPU meet a model on a GPU there."""
    x = on_model_device(model, x)
    flatten = getattr(model, "flatten", None)
    return flatten(x) if callable(flatten) else x


def forked_rng() -> contextlib.AbstractContextManager[Any]:
    """``torch.random.fork_rng`` over the CPU generator and, where CUDA is available, every
    GPU's: what runs inside may seed and draw, and leaves the caller's streams as they
    were. ``torch.manual_seed`` inside reseeds every GPU, so every GPU's state is kept
    (``fork_rng(devices=[])`` would leave them reseeded)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


@contextmanager
def probing(model: Any) -> Iterator[None]:
    """How the tools run a model to find something out: eval mode (no BatchNorm update),
    a forked random stream, no gradients, Pyro's validation off."""
    with torch.no_grad(), forked_rng(), pyro.validation_enabled(False), evaluation_mode(model):
        yield


def probe_traces(model: Any, x: torch.Tensor) -> tuple[poutine.Trace, poutine.Trace]:
    """One trace of ``model.guide`` on ``x`` and of ``model.model`` replayed on it,
    :func:`probing`."""
    with probing(model):
        guide_trace = poutine.trace(model.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model.model, guide_trace)).get_trace(x)
    return guide_trace, model_trace


def deepest_plate(*traces: poutine.Trace) -> int:
    """How many plates the sample sites of ``traces`` sit in at most (the deepest
    vectorized plate dimension), 0 for none."""
    dims = [
        -frame.dim
        for trace in traces
        for site in _sample_sites(trace).values()
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


def _sample_sites(trace: poutine.Trace) -> dict[str, Message[Any, Any]]:
    """The sample sites of ``trace`` (subsample sites left out) by name, in trace order."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def model_sites(model: Any, x: torch.Tensor) -> ModelSites:
    """Trace ``model.guide`` and ``model.model`` once on (two points of) ``x``; return the
    latent sites, the observed sites and the data plate, or raise :class:`ModelError`
    naming what does not fit the protocol."""
    check_protocol(model)
    known = getattr(model, "model_sites", None)
    if isinstance(known, ModelSites):
        return known
    x = on_model_device(model, x[:2])
    batch = x.shape[0]
    name = type(model).__name__
    try:
        guide_trace, model_trace = probe_traces(model, x)
    except (ModelError, DataError):
        raise
    except Exception as error:  # the user's program: any error is its own
        first = (str(error).splitlines() or [""])[0]
        raise ModelError(
            f"{name}.model/guide failed on a batch of shape {tuple(x.shape)} "
            f"({type(error).__name__}: {first}): both must take the mini-batch x as "
            f"their only argument"
        ) from None
    latent = tuple(n for n, s in _sample_sites(guide_trace).items() if not s["is_observed"])
    model_latent = [n for n, s in _sample_sites(model_trace).items() if not s["is_observed"]]
    observed = [n for n, s in _sample_sites(model_trace).items() if s["is_observed"]]
    if not observed:
        raise ModelError(
            f"{name}.model has no observed site: pass the data with pyro.sample(..., obs=x)"
        )
    if not latent:
        raise ModelError(f"{name}.guide has no sample site: it must sample the latent sites")
    missing = [s for s in model_latent if s not in latent]
    if missing:
        raise ModelError(
            f"{name}.guide does not sample the model's latent site(s) {', '.join(missing)}: "
            f"the guide needs one sample site per latent site of the model"
        )
    extra = [s for s in latent if s not in model_latent]
    if extra:
        raise ModelError(
            f"{name}.guide samples {', '.join(extra)}, which the model does not: guide "
            f"sites must have the model's latent site names"
        )
    plates = []
    for site_name in observed + list(latent):
        site = model_trace.nodes[site_name]
        frames = [f for f in site["cond_indep_stack"] if f.size == batch and f.dim == -1]
        if not frames:
            raise ModelError(
                f"site {site_name!r} of {name} is not inside a plate over the data points "
                f"at dim -1: wrap the sample sites in pyro.plate('data', x.shape[0])"
            )
        plates.append(frames[0].name)
    return ModelSites(
        latent=latent,
        observed=tuple(observed),
        data_plate=plates[0],
    )


def plate_nesting(model: Any, x: torch.Tensor) -> int | None:
    """How many plates the model's sites sit in at most: the model's own
    ``max_plate_nesting`` where it has one, else read from one trace of the guide and the
    model on (two points of) ``x`` (eval mode, a forked random stream, no gradients), so
    that the estimators can place their particle plate left of every model plate;
    ``None`` for a model with lazy (uninitialized) layers."""
    known = getattr(model, "max_plate_nesting", None)
    if isinstance(known, int):
        return known
    check_protocol(model)
    from torch.nn.parameter import is_lazy

    if any(is_lazy(p) for module in modules_of(model) for p in module.parameters()):
        # a probe would initialize lazy layers from a stream of its own: leave them to
        # the first step, and the nesting to the estimator (found when it needs it)
        return None
    return deepest_plate(*probe_traces(model, on_model_device(model, x[:2])))


def latent_sites(model: Any, x: torch.Tensor) -> tuple[str, ...]:
    """The latent sites of ``model``: its own ``latent_sites``, or found from traces."""
    known = getattr(model, "latent_sites", None)
    if known is not None and not callable(known):
        return tuple(known)
    return model_sites(model, x).latent


def analytic_kl_is_exact(model: Any, x: torch.Tensor | None = None) -> bool:
    """Whether the closed-form KL of each latent site is the model's KL: the model's own
    ``analytic_kl_is_exact``, else true for a single latent site (its prior depends on no
    other latent) and false for several (a conditional prior's KL is not closed-form)."""
    known = getattr(model, "analytic_kl_is_exact", None)
    if known is True and x is not None:
        reason = closed_form_kl_bias(model, x)
        if reason is not None:
            raise ModelError(
                f"{type(model).__name__} declares analytic_kl_is_exact = True, but {reason}: "
                f"the closed-form KL of that site is not its KL; declare it False (or use "
                f"a guide that draws the parents first)"
            )
    if isinstance(known, bool):
        return known
    if x is None:
        raise ModelError(
            f"{type(model).__name__} does not say whether the closed-form KL is exact "
            f"(analytic_kl_is_exact): pass data so that its latent sites can be counted"
        )
    return len(model_sites(model, x).latent) == 1


def closed_form_kl_bias(model: Any, x: torch.Tensor) -> str | None:
    """Why the closed-form KL of some latent site is not that site's KL, read from the
    programs' dependencies, or ``None`` where it is.

    ``TraceMeanField_ELBO`` replaces each site's ``log q - log p`` by ``KL(q || p)`` with
    ``p`` the prior at the parents' sampled values; that is unbiased only when no model
    parent of a latent is drawn, in the guide, *after* it and from it (a guide
    descendant): a top-down guide passes, a bottom-up one does not. The dependencies come
    from Pyro's provenance tracking (``pyro.infer.inspect.get_dependencies``) on two
    points of ``x``; where that cannot trace the programs, the model's word is taken.
    """
    from pyro.infer.inspect import get_dependencies

    x = on_model_device(model, x[:2])
    prior: dict[str, dict[str, Any]]
    guide: dict[str, dict[str, Any]]
    try:
        with probing(model):
            prior = get_dependencies(model.model, (x,))["prior_dependencies"]  # type: ignore[assignment]
            guide = get_dependencies(model.guide, (x,))["prior_dependencies"]  # type: ignore[assignment]
    except Exception:  # the user's program, under provenance tracking: not checkable
        return None
    descendants: dict[str, set[str]] = {name: set() for name in guide}
    for site, upstream in guide.items():
        for parent in upstream:
            if parent != site and parent in descendants:
                descendants[parent].add(site)
    changed = True
    while changed:  # the transitive closure (a few latent sites)
        changed = False
        for site, below in descendants.items():
            wider = set().union(*(descendants.get(b, set()) for b in below)) | below
            if wider != below:
                descendants[site], changed = wider, True
    for site, upstream in prior.items():
        parents = {p for p in upstream if p != site and p in guide}
        late = sorted(parents & descendants.get(site, set()))
        if late:
            return (
                f"the prior of {site!r} depends on {', '.join(map(repr, late))}, which the "
                f"guide draws after {site!r} and from it"
            )
    return None


def check_data(model: Any, x: torch.Tensor, what: str = "data") -> None:
    """Refuse data ``model`` cannot score, in one line: the model's own ``check_data``
    where it has one, else finite floating-point values, and one trial trace."""
    own = getattr(model, "check_data", None)
    if callable(own):
        own(x, what)
        return
    check_protocol(model)
    if not x.is_floating_point():
        raise DataError(f"{what} holds {x.dtype} values: convert with x.float()")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} holds NaN or infinite values: clean or drop those points")
    if x.shape[0]:
        model_sites(model, x)


# ------------------------------------------------------------------ pictures of any model
def _observed_mean(model: Any, x: torch.Tensor, latents: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean of the first observed site of ``model.model(x)`` with the latents fixed."""
    trace = poutine.trace(poutine.condition(model.model, data=latents)).get_trace(x)
    for site in trace.nodes.values():
        if site["type"] != "sample" or site["name"] in latents or site_is_subsample(site):
            continue
        if site["is_observed"]:
            fn: Any = site["fn"]
            mean: torch.Tensor = fn.mean
            return mean
    raise ModelError(f"{type(model).__name__}.model has no observed site")


def reconstruct(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The mean of p(x | z) at z = the guide's means, shaped like ``x``: the model's own
    ``reconstruct`` where it has one, else from the traces (each latent site of the
    guide, in order, at the mean of its distribution given the ones before)."""
    own = getattr(model, "reconstruct", None)
    if callable(own):
        result: torch.Tensor = own(x)
        return result
    means: dict[str, Any] = {}
    with torch.no_grad(), probing(model):
        for _ in range(64):  # one more latent fixed per pass (nested guides)
            trace = poutine.trace(poutine.condition(model.guide, data=means)).get_trace(x)
            free = [s for n, s in _sample_sites(trace).items() if n not in means]
            if not free:
                break
            first: Any = free[0]
            means[first["name"]] = first["fn"].mean
        return _observed_mean(model, x, means).reshape(x.shape)


def prior_samples(
    model: Any, num_samples: int, example: torch.Tensor, mean: bool = True
) -> torch.Tensor:
    """``num_samples`` draws from the model's prior, decoded: the likelihood's mean (or,
    ``mean=False``, a draw of x), shaped ``(num_samples, *example.shape[1:])``. The
    model's own ``sample`` where it has one; else the model run unconditioned on a batch
    shaped like ``example`` (one data point is enough)."""
    own: Any = getattr(model, "sample", None)
    if callable(own):
        drawn: torch.Tensor
        try:
            drawn = own(num_samples, mean=mean)
            return drawn.reshape(num_samples, *example.shape[1:])
        except TypeError:  # a sample(num_samples) without `mean`
            if mean:
                drawn = own(num_samples)
                return drawn.reshape(num_samples, *example.shape[1:])
    x = example.new_zeros(num_samples, *example.shape[1:])
    with torch.no_grad(), probing(model):
        trace = poutine.trace(poutine.uncondition(model.model)).get_trace(x)
        observed = model_sites(model, example[:1]).observed
        site: Any = trace.nodes[observed[0]]
        values: torch.Tensor = site["fn"].mean if mean else site["value"]
        return values.reshape(x.shape)


def image_shape(model: Any, x: torch.Tensor) -> tuple[int, ...]:
    """``(C, H, W)`` to show a model's data ``x`` as images: its ``data_shape`` where it
    has one of three dimensions; else a square grey image where ``x``'s size is a
    square number, or one row of pixels."""
    shape = tuple(getattr(model, "data_shape", ()) or ())
    if len(shape) == 3:
        return shape
    size = int(torch.Size(x.shape[1:]).numel())
    side = int(round(size**0.5))
    return (1, side, side) if side * side == size else (1, 1, size)
