"""ELBO estimators: Pyro's where they are right, small subclasses where they are not.

Conventions: every bound is in nats; ``elbo`` is higher-is-better and the
quantity minimised is ``loss = -elbo``. Pyro's ``loss`` methods return the loss of the
whole (scaled) data set; divide by the number of data points for nats per data point.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import deepest_plate, forked_rng

PARTICLE_PLATE = "num_particles_vectorized"

#: A site of a Pyro trace (``trace.nodes[name]``), read by key. (Pyro types it as its
#: ``Message``, whose ``fn`` is any callable; the sites read here hold distributions.)
Site = Mapping[str, Any]


def site_total(total: torch.Tensor | float) -> torch.Tensor:
    """A sum over a trace's sample sites, started at ``0.0``: a tensor once any site added
    to it. None did when the model and guide have no sample site, which the library refuses.
    """
    if isinstance(total, torch.Tensor):
        return total
    raise UserInputError("the model and guide have no sample site: there is nothing to estimate")


def _log_prob_sum(site: Site) -> torch.Tensor:
    if "log_prob_sum" in site:
        return site["log_prob_sum"]
    log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_prob, site["scale"], site["mask"]).sum()


# --------------------------------------------------------------------- shared plumbing
def particle_plate(num_particles: int, max_plate_nesting: int = 1) -> pyro.plate:
    """The outermost plate over particles, left of every model plate."""
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))


#: The mini-batch scale ``num_data / batch``: a number, or a tensor of per-data-point
#: weights (a user's tensor-valued ``poutine.scale``) that broadcasts over the batch.
Scale = torch.Tensor | float


def data_scale(trace: poutine.Trace) -> Scale:
    """The mini-batch scale ``num_data / batch`` of the model's trace: the scale of its
    observed sites (1 when unscaled).

    It is the same whether it comes from a subsampled plate or from the library's
    ``poutine.scale``. Only the model knows it: a guide has no observed site, and its
    latent sites may carry a further factor (KL warm-up). So every estimator reads it
    here, from the *model's* trace, and hands it to each term derived from the guide.
    """
    for site in trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
            return site["scale"]
    return 1.0


def relative_scale(site: Site, scale: Scale) -> Scale:
    """A site's scale over the data scale: 1 except under KL warm-up
    (:class:`~pyro_vae.training.schedules.LatentScale`), which scales only the latent sites.
    Where a per-data-point weight is 0 the ratio is 0 (that point does not count)."""
    own = site["scale"]
    if own is scale:
        return 1.0
    if not torch.is_tensor(own) and not torch.is_tensor(scale):
        if own == scale:
            return 1.0
        return own / scale if scale != 0 else 0.0
    own_t, scale_t = torch.as_tensor(own), torch.as_tensor(scale)
    safe = torch.where(scale_t != 0, scale_t, torch.ones_like(scale_t))
    return torch.where(scale_t != 0, own_t / safe, torch.zeros_like(own_t / safe))


def total(values: torch.Tensor, scale: Scale) -> torch.Tensor:
    """``sum_i scale_i * values_i`` over the data points: a per-data-point objective
    ``(batch,)`` scaled to the data set."""
    return (values * scale).sum() if torch.is_tensor(scale) else scale * values.sum()


def per_datapoint(site: Site, value: torch.Tensor, num_particles: int) -> torch.Tensor:
    """Check that ``value`` (a site's log-density) is ``(particles, batch)`` and return it.

    With one particle the estimators add no particle plate (as Pyro's ``Trace_ELBO``
    does not), so a ``(batch,)`` log-density is one particle's: it comes back
    ``(1, batch)``.
    """
    in_data_plate = any(frame.dim == -1 for frame in site["cond_indep_stack"])
    if num_particles == 1 and value.dim() == 1:
        value = value.unsqueeze(0)
    if not in_data_plate or value.dim() != 2 or value.shape[0] != num_particles:
        raise UserInputError(
            f"site {site['name']!r} has a log-density of shape {tuple(value.shape)}, not "
            f"(particles, batch): per-data-point bounds need every sample site inside a "
            f"plate over the data points (pyro.plate('data', x.shape[0])) at dim -1, with "
            f"its event dimensions declared (.to_event); for a model with global latents "
            f"or nested plates use the 'mc' or 'analytic' estimator"
        )
    return value


def site_log_density(
    site: Site,
    scale: Scale,
    num_particles: int,
    log_prob: torch.Tensor | None = None,
) -> torch.Tensor:
    """A site's log-density per particle and data point ``(K, batch)``, as one data
    point's share of the objective: the unscaled log-density (``log_prob``, else the
    trace's), masked by the site's mask and times its scale relative to the data scale
    ``scale``. Multiplying the per-data-point objective by ``scale`` afterwards
    (:func:`total`) gives each site's term its own scale exactly once."""
    if log_prob is None:
        log_prob = site["unscaled_log_prob"] if "unscaled_log_prob" in site else None
        if log_prob is None:
            log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    relative = relative_scale(site, scale)
    log_prob = scale_and_mask(log_prob, 1.0 if _is_one(relative) else relative, site["mask"])
    return per_datapoint(site, log_prob, num_particles)


def _is_one(value: Scale) -> bool:
    return not torch.is_tensor(value) and value == 1.0


def sample_sites(trace: poutine.Trace) -> list[Site]:
    """The sample sites of ``trace``, in order, without the plates' subsample sites."""
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


# --------------------------------------------------------------------- particle estimators
def check_reparameterized(guide_trace: poutine.Trace, estimator: str) -> None:
    """Refuse, naming the site, a guide site without ``rsample`` for an estimator that
    differentiates through the draws."""
    for site in sample_sites(guide_trace):
        if not site["fn"].has_rsample:
            raise UserInputError(
                f"guide site {site['name']!r} ({type(site['fn']).__name__}) is not "
                f"reparameterizable, and {estimator} needs a reparameterized guide"
            )


def trace_log_density(
    trace: poutine.Trace, scale: Scale | None, num_particles: int
) -> torch.Tensor | float:
    """The sum of a trace's sample sites' log-densities per particle and data point
    ``(K, batch)`` (:func:`site_log_density`; ``0.0`` for a trace without sample sites).

    ``scale`` is the model's data scale: each site keeps its scale relative to it (KL
    warm-up tempers the latent sites). ``None`` takes each site at its own scale, i.e.
    untempered: the density the draws came from, whose gradient is a score function.
    """
    log_density: torch.Tensor | float = 0.0
    for site in sample_sites(trace):
        reference = site["scale"] if scale is None else scale
        log_density = log_density + site_log_density(site, reference, num_particles)
    return log_density


def log_densities(
    model_trace: poutine.Trace, guide_trace: poutine.Trace, num_particles: int
) -> tuple[torch.Tensor, torch.Tensor | float, Scale]:
    """Per-particle, per-data-point ``log p(x, z)`` and ``log q(z|x)`` ``(K, batch)`` (one
    data point's share, tempered only by KL warm-up), and the data scale that multiplies
    them (read from the model's trace, :func:`data_scale`)."""
    scale = data_scale(model_trace)
    log_p = trace_log_density(model_trace, scale, num_particles)
    log_q = trace_log_density(guide_trace, scale, num_particles)
    return site_total(log_p), log_q, scale


def log_weights(
    model_trace: poutine.Trace, guide_trace: poutine.Trace, num_particles: int
) -> tuple[torch.Tensor, Scale]:
    """Per-particle, per-data-point ``log p(x, z) - log q(z|x)`` ``(K, batch)`` (one data
    point's share, tempered only by KL warm-up), and the data scale that multiplies it."""
    log_p, log_q, scale = log_densities(model_trace, guide_trace, num_particles)
    return site_total(log_p - log_q), scale


def score_log_density(guide_trace: poutine.Trace, num_particles: int) -> torch.Tensor:
    """``log q_phi(z | x)`` per particle and data point ``(K, batch)``, untempered, at the
    guide's draws: under :class:`DetachedDraws` the draws carry no gradient, so the
    gradient of this is the score ``grad_phi log q_phi(z)`` of the score-function
    estimators (the draws came from q itself, not from KL warm-up's tempered density)."""
    return site_total(trace_log_density(guide_trace, None, num_particles))


# --------------------------------------------------------------------- detached draws
_NO_SHAPE = torch.Size()


class _DetachedDraw(dist.TorchDistribution):
    """A guide site's distribution whose draws carry no gradient (``has_rsample`` is
    False), with its density unchanged. It draws with the base's ``rsample`` where it has
    one (under ``no_grad``), so that it takes the same noise as the reparameterized
    estimators for the same seed: same draws, different gradient."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, base: torch.distributions.Distribution) -> None:
        self.base_dist = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self) -> Any:
        return self.base_dist.support

    def expand(self, batch_shape, _instance=None) -> _DetachedDraw:
        return _DetachedDraw(self.base_dist.expand(batch_shape))

    def sample(
        self, sample_shape: torch.Size | list[int] | tuple[int, ...] = _NO_SHAPE
    ) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        with torch.no_grad():
            if self.base_dist.has_rsample:
                return self.base_dist.rsample(sample_shape)
            return self.base_dist.sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base_dist.log_prob(value)


class DetachedDraws(Messenger):
    """Every latent sample site of the program it wraps draws without a gradient path
    (its distribution's ``has_rsample`` reads False): the guide's sites treated as not
    reparameterized, by the estimator, whatever the guide. The density ``log q_phi(z|x)``
    keeps its dependence on phi, which is what the score-function estimators
    differentiate (``score``, ``vimco``, ``rws``, ``tracegraph``)."""

    def _pyro_sample(self, msg: Any) -> None:
        fn = msg["fn"]
        if msg["is_observed"] or isinstance(fn, _DetachedDraw) or site_is_subsample(msg):
            return
        msg["fn"] = _DetachedDraw(fn)


def detach_distribution(fn: dist.Distribution, site_name: str = "") -> dist.Distribution:
    """The same distribution with its parameters cut from the graph (values kept)."""
    if isinstance(fn, torch.distributions.Independent):
        base = detach_distribution(fn.base_dist, site_name)
        return dist.Independent(base, fn.reinterpreted_batch_ndims)
    if isinstance(fn, torch.distributions.Normal):
        return dist.Normal(fn.loc.detach(), fn.scale.detach(), validate_args=False)
    raise UserInputError(
        f"guide site {site_name!r} is a {type(fn).__name__}: the path-derivative estimators "
        f"(stl, dreg) and the penalty support Normal guide sites"
    )


class _ParamsAsGiven(Messenger):
    """``pyro.param(name, tensor)`` returns ``tensor`` and leaves the param store alone."""

    def _pyro_param(self, msg: dict) -> None:
        if len(msg["args"]) > 1 and torch.is_tensor(msg["args"][1]):
            msg["value"] = msg["args"][1]
            msg["done"] = True


class _Call(nn.Module):
    def __init__(self, owner: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def guide_log_prob_detached(
    guide: Callable,
    guide_trace: poutine.Trace,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    scale: Scale,
    max_plate_nesting: float = 1,
    values: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""``log q_{stop_grad(phi)}(z | x)`` per particle and data point ``(K, batch)``.

    The guide's density with its *parameters* detached, at the sampled ``z`` (or at
    ``values``), keeping every dependence on ``z`` itself: the path-derivative term of
    Roeder, Wu & Duvenaud, "Sticking the Landing" (2017). With one latent site the
    site's distribution parameters depend on x alone, so detaching them is exact; with
    several (hierarchical guides, where q(z1 | z2, x) depends on z2) the guide is re-run
    on the same ``z`` with detached copies of its module's parameters.

    ``scale`` is the data scale of the *model's* trace (:func:`data_scale`): the guide's
    trace has no observed site to read it from, and its latent sites carry it already.
    Like every per-data-point term, the result is one data point's share; the caller
    multiplies the objective by ``scale`` once (:func:`total`).
    """
    sites = sample_sites(guide_trace)
    values = values if values is not None else {site["name"]: site["value"] for site in sites}
    if len(sites) == 1:
        site = sites[0]
        fn = detach_distribution(site["fn"], site["name"])
        return site_log_density(site, scale, num_particles, fn.log_prob(values[site["name"]]))
    # (through the library's poutine.scale and plate wrappers, to the bound method)
    owner = getattr(inspect.unwrap(guide), "__self__", None)
    if not isinstance(owner, nn.Module):
        raise UserInputError(
            "stl and dreg with several latent sites need the guide to be a method of a "
            "torch.nn.Module (like VAE.guide), to re-run it with detached parameters"
        )
    plate = particles(num_particles, max_plate_nesting)

    def rerun(*run_args, **run_kwargs) -> poutine.Trace:
        with poutine.block(), _ParamsAsGiven(), warnings.catch_warnings():
            # pyro.module warns that detached copies are not registered: that is the point
            warnings.filterwarnings("ignore", message=".*not registered in the param store")
            conditioned = poutine.condition(plate(guide), data=values)
            return poutine.trace(conditioned).get_trace(*run_args, **run_kwargs)

    detached = {f"owner.{name}": p.detach() for name, p in owner.named_parameters()}
    trace = torch.func.functional_call(_Call(owner, rerun), detached, args, kwargs)
    log_q: torch.Tensor | float = 0.0
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if not isinstance(site["fn"], dist.Distribution):
            continue
        log_prob = site["fn"].log_prob(site["value"])
        log_q = log_q + site_log_density(guide_trace.nodes[name], scale, num_particles, log_prob)
    return site_total(log_q)


def particles(num_particles: int, max_plate_nesting: float) -> Callable[[Callable], Callable]:
    """Wrap a program in the particle plate; with one particle, leave it as it is (as
    Pyro's ``Trace_ELBO`` does), so that a program sees the shapes it was written for."""
    if num_particles == 1:
        return lambda program: program
    if max_plate_nesting == float("inf"):
        raise ValueError("max_plate_nesting must be known before the particle plate is placed")
    return particle_plate(num_particles, int(max_plate_nesting))


def find_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """The plate nesting of a model and guide, from one run of each as Pyro's
    ``ELBO._guess_max_plate_nesting`` finds it, but in a forked random stream (it draws
    none of the caller's noise) and without logging: the deepest plate dimension of any
    sample site."""
    with forked_rng(), poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return deepest_plate(model_trace, guide_trace)


class ParticleELBO(ELBO):
    """Base of the estimators here: K vectorized particles, a value per data point.

    Subclasses implement :meth:`value_and_surrogate`, returning per data point the
    objective's value and a surrogate whose gradient is the estimator's gradient, and the
    data scale read from the model's trace (:func:`data_scale`), which multiplies both
    afterwards, once (:func:`total`).

    ``max_plate_nesting=None`` (or ``inf``) finds the model's plate nesting from one run of
    the model and guide, as Pyro's ``Trace_ELBO`` does, but in a forked random stream, so
    that finding it draws no noise the caller's next step would have used. With one
    particle no particle plate is added, and nothing needs finding.
    """

    #: name used in error messages
    estimator = "this estimator"
    #: the guide's draws carry no gradient (:class:`DetachedDraws`): score-function
    #: estimators, which then accept any guide; the others need a reparameterized one
    detached_draws = False

    def __init__(self, num_particles: int = 1, max_plate_nesting: float | None = None) -> None:
        nesting = float("inf") if max_plate_nesting is None else max_plate_nesting
        super().__init__(num_particles=num_particles, max_plate_nesting=nesting)

    def _guess_max_plate_nesting(self, model, guide, args, kwargs):
        self.max_plate_nesting = find_plate_nesting(model, guide, args, kwargs)

    def _plate(self, model, guide, args, kwargs) -> Callable[[Callable], Callable]:
        if self.num_particles > 1 and self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        return particles(self.num_particles, self.max_plate_nesting)

    def _get_trace(self, model, guide, args, kwargs):
        plate = self._plate(model, guide, args, kwargs)
        nesting = self.max_plate_nesting + (self.num_particles > 1)
        guide_program = plate(guide)
        if self.detached_draws:
            guide_program = DetachedDraws()(guide_program)
        model_trace, guide_trace = get_importance_trace(
            "flat", nesting, plate(model), guide_program, args, kwargs
        )
        if not self.detached_draws:
            check_reparameterized(guide_trace, self.estimator)
        return model_trace, guide_trace

    def _get_traces(self, model, guide, args, kwargs):
        yield self._get_trace(model, guide, args, kwargs)

    def value_and_surrogate(
        self, model, guide, args, kwargs
    ) -> tuple[torch.Tensor, torch.Tensor, Scale]:
        """Per data point: the objective (detached), the surrogate, and the data scale."""
        raise NotImplementedError

    def _elbo_and_surrogate(self, model, guide, args, kwargs):
        value, surrogate, scale = self.value_and_surrogate(model, guide, args, kwargs)
        return total(value, scale), total(surrogate, scale)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """-objective of the data set (scaled mini-batch), as a float."""
        with torch.no_grad():
            elbo, _ = self._elbo_and_surrogate(model, guide, args, kwargs)
        return -elbo.item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-objective, differentiable with the estimator's gradient."""
        elbo, surrogate = self._elbo_and_surrogate(model, guide, args, kwargs)
        return -(elbo + (surrogate - surrogate.detach()))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        elbo, surrogate = self._elbo_and_surrogate(model, guide, args, kwargs)
        if surrogate.requires_grad:
            (-surrogate).backward()
        return -elbo.item()


def vectorized_traces(
    model: Callable, guide: Callable, x: torch.Tensor, num_samples: int, **kwargs
) -> tuple[poutine.Trace, poutine.Trace]:
    """Run the guide with ``num_samples`` vectorized draws and the model replayed on them.

    With one draw no particle plate is added: the networks see the batch's own shapes, as
    in training with one particle. With several, every network receives inputs with a
    leading sample dimension ``(num_samples, batch, ...)``; a network that cannot take
    them (``BatchNorm1d``, a hand-written ``view(batch, -1)``) gets one line saying so.
    """
    plate = particles(num_samples, 1)
    try:
        guide_trace = poutine.trace(plate(guide)).get_trace(x, **kwargs)
        model_trace = poutine.trace(poutine.replay(plate(model), trace=guide_trace)).get_trace(
            x, **kwargs
        )
    except RuntimeError as error:
        if num_samples == 1:
            raise
        owner = getattr(inspect.unwrap(model), "__self__", None)
        name = type(owner).__name__ if owner is not None else "the model"
        first = (str(error).splitlines() or [""])[0]
        raise UserInputError(
            f"{name}'s networks failed on {num_samples} samples of z per data point, inputs "
            f"of shape ({num_samples}, {x.shape[0]}, ...) ({type(error).__name__}: {first}): "
            f"networks must accept leading sample dimensions (flatten them with "
            f"z.reshape(-1, z.shape[-1]) and reshape the output back; BatchNorm1d needs "
            f"this), or use one sample"
        ) from None
    return model_trace, guide_trace
