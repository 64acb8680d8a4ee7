"""ELBO estimators: Pyro's where they are right, small subclasses where they are not.

Conventions (DESIGN.md): every bound is in nats; ``elbo`` is higher-is-better and the
quantity minimised is ``loss = -elbo``. Pyro's ``loss`` methods return the loss of the
whole (scaled) data set; divide by the number of data points for nats per data point.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch import nn
from torch.distributions import kl_divergence

from .compat import values_trace
from .errors import UserInputError
from .model import DATA_PLATE

#: Estimator names accepted by :func:`make_elbo`.
ESTIMATORS = ("mc", "analytic", "iwae", "renyi", "stl", "dreg", "penalty")
PARTICLE_PLATE = "num_particles_vectorized"


def make_elbo(
    name: str,
    num_particles: int = 1,
    *,
    alpha: float = 0.5,
    max_plate_nesting: int = 1,
) -> ELBO:
    """Build the estimator ``name`` with ``num_particles`` samples per data point.

    - ``"mc"``: :class:`pyro.infer.Trace_ELBO`, Monte Carlo KL, particles vectorized.
    - ``"analytic"``: closed-form KL, :class:`ClosedFormKL_ELBO` (a
      :class:`pyro.infer.TraceMeanField_ELBO` that computes only what it uses).
    - ``"iwae"``: importance-weighted bound L_K (Burda et al., 2016), per data point.
    - ``"renyi"``: Renyi bound of order ``alpha`` (Li & Turner, 2016), per data point.
    - ``"stl"``: the ELBO with the path-derivative gradient (Roeder et al., 2017).
    - ``"dreg"``: the IWAE bound with the doubly reparameterized gradient (Tucker et al., 2018).
    - ``"penalty"``: the seed question's ``sum_j mu_j^2 + (sigma_j - 1)^2`` in place of
      the KL; not a bound (see :class:`PenaltyObjective`).
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise UserInputError(
            f"the number of particles must be an integer >= 1, got {num_particles}"
        )
    vectorize = num_particles > 1
    if name == "mc":
        return Trace_ELBO(
            num_particles=num_particles,
            vectorize_particles=vectorize,
            max_plate_nesting=max_plate_nesting,
        )
    if name == "analytic":
        return ClosedFormKL_ELBO(
            num_particles=num_particles,
            vectorize_particles=vectorize,
            max_plate_nesting=max_plate_nesting,
        )
    if name == "iwae":
        return ImportanceWeightedELBO(num_particles, alpha=0.0, max_plate_nesting=max_plate_nesting)
    if name == "renyi":
        if alpha == 1:
            raise UserInputError("renyi with alpha = 1 is the ELBO: use --estimator mc")
        return ImportanceWeightedELBO(
            num_particles, alpha=alpha, max_plate_nesting=max_plate_nesting
        )
    if name == "stl":
        return StickingTheLandingELBO(num_particles, max_plate_nesting)
    if name == "dreg":
        return DReGELBO(num_particles, max_plate_nesting)
    if name == "penalty":
        return PenaltyObjective(num_particles, max_plate_nesting)
    raise UserInputError(f"unknown estimator {name!r}: choose one of {', '.join(ESTIMATORS)}")


def check_estimator_fits(name: str, vae) -> None:
    """Refuse an estimator that would be wrong for this model and guide, saying why."""
    if name == "analytic" and not getattr(vae, "analytic_kl_is_exact", True):
        raise UserInputError(
            "the analytic (closed-form) KL of TraceMeanField_ELBO is biased with the "
            "bottom-up guide: z1's model parent z2 is sampled after z1 in q(z1|x) q(z2|z1), "
            "so KL(q(z1|x) || p(z1|z2)) is taken at a z2 that depends on z1. Use --estimator "
            "mc, or --guide top-down"
        )


class ClosedFormKL_ELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` that computes only the log-densities it uses.

    Pyro's class scores every site of both traces, ``log q(z|x)`` and ``log p(z)``
    included, before using the closed-form ``KL(q || p)`` in their place. This subclass
    computes the observed sites' log-densities and the KL terms alone (falling back to
    ``log p(z) - log q(z|x)`` for a site without a registered KL), which removes two
    Normal log-densities and the trace copies from every step. Same value and gradient
    (tested against ``TraceMeanField_ELBO`` for the same noise). Under Pyro validation it
    runs the parent's checked path.
    """

    def _get_trace(self, model, guide, args, kwargs):
        if is_validation_enabled():
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(model, trace=guide_trace), graph_type="flat"
        ).get_trace(*args, **kwargs)
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo = self.differentiable_elbo_particle(model_trace, guide_trace)
        loss = -(elbo.detach() if torch.jit.is_tracing() else torch_item(elbo))
        return loss, -elbo

    def differentiable_elbo_particle(self, model_trace, guide_trace) -> torch.Tensor:
        """One particle's ELBO, ``E[log p(x|z)] - KL(q || p)``, as a tensor."""
        elbo = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                elbo = elbo + _log_prob_sum(site)
                continue
            guide_site = guide_trace.nodes[name]
            try:
                kl = kl_divergence(guide_site["fn"], site["fn"])
            except NotImplementedError:
                elbo = elbo + _log_prob_sum(site) - _log_prob_sum(guide_site)
                continue
            kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
            if torch.is_tensor(kl):
                elbo = elbo - kl.sum()
            else:
                elbo = elbo - kl * torch.Size(guide_site["fn"].batch_shape).numel()
        for name, guide_site in guide_trace.nodes.items():  # auxiliary guide sites
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                if not site_is_subsample(guide_site):
                    elbo = elbo - _log_prob_sum(guide_site)
        return elbo


def _log_prob_sum(site: dict) -> torch.Tensor:
    if "log_prob_sum" in site:
        return site["log_prob_sum"]
    log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_prob, site["scale"], site["mask"]).sum()


# --------------------------------------------------------------------- shared plumbing
def particle_plate(num_particles: int, max_plate_nesting: int = 1) -> pyro.plate:
    """The outermost plate over particles, left of every model plate."""
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))


def _data_scale(trace: poutine.Trace) -> float:
    """``num_data / batch`` of the data plate (1 when the plate is not subsampled)."""
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            if frame.name == DATA_PLATE and frame.full_size is not None:
                return frame.full_size / frame.size
    return 1.0


def per_datapoint(site: dict, value: torch.Tensor, num_particles: int) -> torch.Tensor:
    """Check that ``value`` (a site's log-density) is ``(particles, batch)`` and return it."""
    in_data_plate = any(frame.name == DATA_PLATE for frame in site["cond_indep_stack"])
    if not in_data_plate or value.dim() != 2 or value.shape[0] != num_particles:
        raise UserInputError(
            f"site {site['name']!r} has a log-density of shape {tuple(value.shape)}, not "
            f"(particles, batch): per-data-point bounds need every sample site inside the "
            f"{DATA_PLATE!r} plate with its event dimensions declared (.to_event)"
        )
    return value


def sample_sites(trace: poutine.Trace) -> list[dict]:
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


# --------------------------------------------------------------------- particle estimators
def check_reparameterized(guide_trace: poutine.Trace, estimator: str) -> None:
    for site in sample_sites(guide_trace):
        if not site["fn"].has_rsample:
            raise UserInputError(
                f"guide site {site['name']!r} ({type(site['fn']).__name__}) is not "
                f"reparameterizable, and {estimator} needs a reparameterized guide"
            )


def _tempered(site: dict, log_prob: torch.Tensor, data_scale: float, num_particles: int):
    """A site's log-density per data point, times its scale relative to the data scale.

    The relative scale is 1 except under KL warm-up (:class:`~pyro_vae.training.LatentScale`).
    """
    scale = site["scale"] / data_scale
    if site["mask"] is not None:
        log_prob = log_prob * site["mask"]
    return per_datapoint(site, log_prob * scale if scale != 1.0 else log_prob, num_particles)


def log_weights(
    model_trace: poutine.Trace, guide_trace: poutine.Trace, num_particles: int
) -> tuple[torch.Tensor, float]:
    """Per-particle, per-data-point ``log p(x, z) - log q(z|x)`` ``(K, batch)``, data scale."""
    data_scale = _data_scale(model_trace)
    log_w = 0.0
    for site in sample_sites(model_trace):
        log_w = log_w + per_datapoint(site, site["log_prob"], num_particles)
    for site in sample_sites(guide_trace):
        log_w = log_w - per_datapoint(site, site["log_prob"], num_particles)
    return log_w / data_scale, data_scale


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
    max_plate_nesting: int = 1,
    values: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""``log q_{stop_grad(phi)}(z | x)`` per particle and data point ``(K, batch)``.

    The guide's density with its *parameters* detached, at the sampled ``z`` (or at
    ``values``), keeping every dependence on ``z`` itself: the path-derivative term of
    Roeder, Wu & Duvenaud, "Sticking the Landing" (2017). With one latent site the
    site's distribution parameters depend on x alone, so detaching them is exact; with
    several (hierarchical guides, where q(z1 | z2, x) depends on z2) the guide is re-run
    on the same ``z`` with detached copies of its module's parameters.
    """
    data_scale = _data_scale(guide_trace)
    sites = sample_sites(guide_trace)
    values = values if values is not None else {site["name"]: site["value"] for site in sites}
    if len(sites) == 1:
        site = sites[0]
        fn = detach_distribution(site["fn"], site["name"])
        return _tempered(site, fn.log_prob(values[site["name"]]), data_scale, num_particles)
    owner = getattr(guide, "__self__", None)
    if not isinstance(owner, nn.Module):
        raise UserInputError(
            "stl and dreg with several latent sites need the guide to be a method of a "
            "torch.nn.Module (like VAE.guide), to re-run it with detached parameters"
        )
    plate = particle_plate(num_particles, max_plate_nesting)

    def rerun(*run_args, **run_kwargs) -> poutine.Trace:
        with poutine.block(), _ParamsAsGiven(), warnings.catch_warnings():
            # pyro.module warns that detached copies are not registered: that is the point
            warnings.filterwarnings("ignore", message=".*not registered in the param store")
            conditioned = poutine.condition(plate(guide), data=values)
            return poutine.trace(conditioned).get_trace(*run_args, **run_kwargs)

    detached = {f"owner.{name}": p.detach() for name, p in owner.named_parameters()}
    trace = torch.func.functional_call(_Call(owner, rerun), detached, args, kwargs)
    log_q = 0.0
    for site in sample_sites(trace):
        if not isinstance(site["fn"], dist.Distribution):
            continue
        log_prob = site["fn"].log_prob(site["value"])
        log_q = log_q + _tempered(
            guide_trace.nodes[site["name"]], log_prob, data_scale, num_particles
        )
    return log_q


class ParticleELBO(ELBO):
    """Base of the estimators here: K vectorized particles, a value per data point.

    Subclasses implement :meth:`value_and_surrogate`, returning per data point the
    objective's value and a surrogate whose gradient is the estimator's gradient. The
    mini-batch scale ``num_data / batch`` multiplies both afterwards.
    """

    #: name used in error messages
    estimator = "this estimator"

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1) -> None:
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)

    def _get_trace(self, model, guide, args, kwargs):
        plate = particle_plate(self.num_particles, self.max_plate_nesting)
        model_trace, guide_trace = get_importance_trace(
            "flat", self.max_plate_nesting + 1, plate(model), plate(guide), args, kwargs
        )
        check_reparameterized(guide_trace, self.estimator)
        return model_trace, guide_trace

    def _get_traces(self, model, guide, args, kwargs):
        yield self._get_trace(model, guide, args, kwargs)

    def value_and_surrogate(
        self, model, guide, args, kwargs
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per data point: the objective (detached), the surrogate, and the data scale."""
        raise NotImplementedError

    def _elbo_and_surrogate(self, model, guide, args, kwargs):
        value, surrogate, data_scale = self.value_and_surrogate(model, guide, args, kwargs)
        return data_scale * value.sum(), data_scale * surrogate.sum()

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


class ImportanceWeightedELBO(ParticleELBO):
    r"""Importance-weighted (alpha = 0) and Renyi bounds, per data point.

    With log-weights ``log w_k = log p(x, z_k) - log q(z_k | x)`` for K draws from the
    guide, the bound for each data point is

    .. math::
        L_{\alpha} = \frac{1}{1-\alpha} \log \frac{1}{K} \sum_k w_k^{1-\alpha},

    which for alpha = 0 is the IWAE bound L_K (Burda, Grosse & Salakhutdinov,
    "Importance Weighted Autoencoders", 2016) and for K = 1 is the ELBO (Renyi bounds:
    Li & Turner, "Renyi Divergence Variational Inference", 2016). The log-sum-exp runs
    over particles separately for each data point, and the mini-batch scale
    ``num_data / batch`` multiplies the bound *after* it; scaling the log-weights before
    the log-sum-exp, as :class:`pyro.infer.RenyiELBO` does under a subsampled plate,
    gives a different, wrong objective. Site scales other than the data scale (KL
    warm-up) temper their log-densities inside the weight. The gradient is the
    reparameterised gradient of the bound.
    """

    estimator = "iwae"

    def __init__(self, num_particles: int = 5, alpha: float = 0.0, max_plate_nesting: int = 1):
        if alpha == 1:
            raise ValueError("alpha = 1 is the ELBO: use Trace_ELBO")
        super().__init__(num_particles, max_plate_nesting)
        self.alpha = float(alpha)

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """The bound per data point from log-weights ``(K, batch)``."""
        scaled = (1.0 - self.alpha) * log_w
        return (torch.logsumexp(scaled, 0) - math.log(self.num_particles)) / (1.0 - self.alpha)

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        log_w, data_scale = log_weights(model_trace, guide_trace, self.num_particles)
        return self.bound(log_w.detach()), self.bound(log_w), data_scale


class StickingTheLandingELBO(ParticleELBO):
    r"""The ELBO with the path-derivative ("sticking the landing") gradient.

    Value: the ELBO averaged over K particles, exactly as ``Trace_ELBO``. Gradient:
    ``1/K sum_k grad [log p(x, z_k) - log q_{stop_grad(phi)}(z_k | x)]``, the
    reparameterised gradient with the score term ``-grad_phi log q_phi(z)`` dropped
    (Roeder, Wu & Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient
    Estimators for Variational Inference", 2017). The dropped term has expectation
    zero, so the estimator is unbiased; its variance vanishes when q is the exact
    posterior, where ``log p(x, z) - log q(z|x)`` is constant in z.
    """

    estimator = "stl"

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        log_w, data_scale = log_weights(model_trace, guide_trace, self.num_particles)
        log_q = log_w.new_zeros(())
        for site in sample_sites(guide_trace):
            log_q = log_q + per_datapoint(site, site["log_prob"], self.num_particles) / data_scale
        log_q_stl = guide_log_prob_detached(
            guide, guide_trace, args, kwargs, self.num_particles, self.max_plate_nesting
        )
        path_log_w = log_w + log_q - log_q_stl
        return log_w.detach().mean(0), path_log_w.mean(0), data_scale


class DReGELBO(ImportanceWeightedELBO):
    r"""IWAE bound with the doubly reparameterized gradient (DReG).

    Tucker, Lawson, Gu & Maddison, "Doubly Reparameterized Gradient Estimators for Monte
    Carlo Objectives" (2018). With normalised weights ``w~_k = w_k / sum_j w_j``:

    - generative (model) parameters: the ordinary IWAE gradient
      ``sum_k w~_k grad_theta log p(x, z_k)``;
    - inference (guide) parameters: ``sum_k w~_k^2 d log w_k / d z_k * d z_k / d phi``,
      with ``log w_k`` using ``log q`` with detached parameters.

    Both are computed from one surrogate: the model's density at leaf copies of the
    samples (so that its gradient is the direct one), plus the path term
    ``sum_k (w~_k^2 d log w_k / d z_k) . z_k`` with the coefficient detached. A
    parameter shared by model and guide receives both contributions.
    """

    estimator = "dreg"

    def __init__(self, num_particles: int = 5, max_plate_nesting: int = 1):
        super().__init__(num_particles, alpha=0.0, max_plate_nesting=max_plate_nesting)

    def value_and_surrogate(self, model, guide, args, kwargs):
        plate = particle_plate(self.num_particles, self.max_plate_nesting)
        guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
        guide_trace = prune_subsample_sites(guide_trace)
        check_reparameterized(guide_trace, self.estimator)
        guide_trace.compute_log_prob()
        samples = {site["name"]: site["value"] for site in sample_sites(guide_trace)}
        leaves = {name: value.detach().requires_grad_() for name, value in samples.items()}
        # replay (not condition): the latent sites stay latent, so handlers such as the
        # KL warm-up's LatentScale still recognise them
        at_leaves = values_trace(leaves)
        model_trace = poutine.trace(poutine.replay(plate(model), trace=at_leaves)).get_trace(
            *args, **kwargs
        )
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        data_scale = _data_scale(model_trace)
        log_p = 0.0
        for site in sample_sites(model_trace):
            log_p = log_p + per_datapoint(site, site["log_prob"], self.num_particles) / data_scale
        log_q = guide_log_prob_detached(
            guide, guide_trace, args, kwargs, self.num_particles, self.max_plate_nesting, leaves
        )
        log_w = log_p - log_q
        value = self.bound(log_w.detach())
        if not torch.is_grad_enabled():
            return value, value, data_scale
        weights = torch.softmax(log_w.detach(), 0)
        names = list(leaves)
        grads = torch.autograd.grad(
            (weights.pow(2) * log_w).sum(), [leaves[n] for n in names], retain_graph=True
        )
        path = sum(
            (grad.detach() * samples[name]).reshape(self.num_particles, grad.shape[1], -1).sum(-1)
            for name, grad in zip(names, grads)
        )
        surrogate = (weights * log_p).sum(0) + path.sum(0)
        return value, surrogate, data_scale


class PenaltyObjective(ParticleELBO):
    r"""The seed question's ad-hoc objective: reconstruction minus a quadratic penalty.

    .. math::
        \tilde{L} = E_q[\log p(x|z)] - \sum_j \big(\mu_j^2 + (\sigma_j - 1)^2\big)

    with (mu, sigma) the guide's location and scale at each latent site, in place of
    ``KL(q(z|x) || p(z))``. It pulls q towards N(0, 1) as the KL does, but it is **not a
    lower bound** on log p(x): the KL grows like ``-log sigma`` as sigma -> 0 while this
    penalty stays below 1 per dimension, so a sharp q makes it exceed log p(x). Provided
    to measure exactly that (``pyro-vae compare``), not to train models one trusts.
    """

    estimator = "penalty"

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        data_scale = _data_scale(model_trace)
        objective = 0.0
        for site in sample_sites(model_trace):
            if site["is_observed"]:
                log_lik = per_datapoint(site, site["log_prob"], self.num_particles)
                objective = objective + log_lik / data_scale
        for site in sample_sites(guide_trace):
            normal = site["fn"]
            while isinstance(normal, torch.distributions.Independent):
                normal = normal.base_dist
            if not isinstance(normal, torch.distributions.Normal):
                raise UserInputError(
                    f"the penalty needs Normal guide sites; {site['name']!r} is a "
                    f"{type(normal).__name__}"
                )
            penalty = (normal.loc.pow(2) + (normal.scale - 1).pow(2)).sum(-1)
            relative = site["scale"] / data_scale  # KL warm-up scales the penalty too
            objective = objective - per_datapoint(site, penalty * relative, self.num_particles)
        return objective.detach().mean(0), objective.mean(0), data_scale


class FreeBitsELBO(ParticleELBO):
    r"""The ELBO, trained with "free bits" per latent layer.

    Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow"
    (2016): each latent site's KL, averaged over the mini-batch, enters the training
    objective as ``max(free_bits, KL_l)``; below the threshold it gets no gradient, so
    the encoder is not pushed to switch the layer off. The *reported* value is the
    ELBO itself, unchanged. ``kl="analytic"`` uses the closed-form KL per site (as
    TraceMeanField_ELBO), ``kl="mc"`` uses ``log q - log p`` at the samples.
    """

    estimator = "free bits"

    def __init__(
        self,
        num_particles: int = 1,
        free_bits: float = 0.0,
        kl: str = "analytic",
        max_plate_nesting: int = 1,
    ) -> None:
        super().__init__(num_particles, max_plate_nesting)
        self.free_bits = float(free_bits)
        self.kl = kl

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        data_scale = _data_scale(model_trace)
        value = surrogate = 0.0
        for site in sample_sites(model_trace):
            log_p = per_datapoint(site, site["log_prob"], self.num_particles) / data_scale
            if site["is_observed"]:
                value, surrogate = value + log_p, surrogate + log_p
                continue
            guide_site = guide_trace.nodes[site["name"]]
            relative = guide_site["scale"] / data_scale  # the KL warm-up factor, else 1
            if self.kl == "analytic":
                kl = kl_divergence(guide_site["fn"], site["fn"]) * relative
                kl = per_datapoint(site, kl.expand(log_p.shape), self.num_particles)
            else:
                log_q = per_datapoint(guide_site, guide_site["log_prob"], self.num_particles)
                kl = log_q / data_scale - log_p
            # the threshold applies to the KL itself: beta * max(free_bits, KL) under warm-up
            unannealed = kl.detach().mean() / relative if relative else kl.detach().mean()
            counts = bool(unannealed >= self.free_bits)
            value = value - kl
            surrogate = surrogate - (kl if counts else kl.detach())
        return value.detach().mean(0), surrogate.mean(0), data_scale


# --------------------------------------------------------------------- ELBO, term by term
@dataclass
class ElboTerms:
    """The ELBO of each data point and its two terms, in nats (higher ELBO is better).

    ``elbo = expected_log_likelihood - kl``; ``kl_by_site`` splits ``kl`` by latent site.
    """

    elbo: torch.Tensor
    expected_log_likelihood: torch.Tensor
    kl: torch.Tensor
    kl_by_site: dict[str, torch.Tensor]


def vectorized_traces(
    model: Callable, guide: Callable, x: torch.Tensor, num_samples: int, **kwargs
) -> tuple[poutine.Trace, poutine.Trace]:
    """Run the guide with ``num_samples`` vectorized draws and the model replayed on them."""
    plate = particle_plate(num_samples)
    guide_trace = poutine.trace(plate(guide)).get_trace(x, **kwargs)
    model_trace = poutine.trace(poutine.replay(plate(model), trace=guide_trace)).get_trace(
        x, **kwargs
    )
    return model_trace, guide_trace


def elbo_terms(vae, x: torch.Tensor, kl: str = "analytic", num_samples: int = 1) -> ElboTerms:
    """ELBO per data point, split into expected log-likelihood and KL.

    ``kl="analytic"`` uses closed-form ``KL(q(z|x) || p(z))`` per latent site (as
    ``TraceMeanField_ELBO`` does; for a hierarchical model the conditional prior's KL is
    averaged over the samples of its parents); ``kl="mc"`` uses ``log q(z|x) - log p(z)``
    at the same samples (as ``Trace_ELBO``). The expected log-likelihood is averaged over
    ``num_samples`` draws of z in both cases. Works for any model/guide pair whose
    sites live in the ``"data"`` plate with observed sites and latent sites named alike.
    """
    if kl not in ("analytic", "mc"):
        raise UserInputError(f"kl must be 'analytic' or 'mc', got {kl!r}")
    if kl == "analytic":
        check_estimator_fits("analytic", vae)
    x = vae.flatten(x)
    model_trace, guide_trace = vectorized_traces(vae.model, vae.guide, x, num_samples)
    log_likelihood = 0.0
    kl_by_site: dict[str, torch.Tensor] = {}
    for site in sample_sites(model_trace):
        log_p = per_datapoint(site, site["fn"].log_prob(site["value"]), num_samples)
        if site["is_observed"]:
            log_likelihood = log_likelihood + log_p
            continue
        guide_site = guide_trace.nodes[site["name"]]
        if kl == "analytic":
            kl_site = kl_divergence(guide_site["fn"], site["fn"])
            kl_site = kl_site.expand(log_p.shape)
        else:
            kl_site = guide_site["fn"].log_prob(guide_site["value"]) - log_p
        kl_by_site[site["name"]] = kl_site.mean(0)
    expected_log_likelihood = log_likelihood.mean(0)
    total_kl = sum(kl_by_site.values())
    return ElboTerms(
        elbo=expected_log_likelihood - total_kl,
        expected_log_likelihood=expected_log_likelihood,
        kl=total_kl,
        kl_by_site=kl_by_site,
    )


# --------------------------------------------------------------------- the seed's eq. 43
def tutorial_loss(vae, x: torch.Tensor, noise: torch.Tensor, kl: str = "analytic") -> torch.Tensor:
    r"""The seed tutorial's VAE loss in plain torch, per data point (nats, lower is better).

    ``kl="analytic"`` is its closed-form loss, eq. 43 (with the general-prior KL derived
    just before its eq. 40):

    .. math::
        \mathcal{L} = -\sum_j \Big[\log\frac{\sigma_{q,j}}{\sigma_{p,j}}
            - \frac{\sigma_{q,j}^2 + (\mu_{q,j} - \mu_{p,j})^2}{2\sigma_{p,j}^2}
            + \frac{1}{2}\Big] - \frac{1}{L}\sum_{l=1}^{L} \log p(x | z^{(l)}),
        \qquad z^{(l)} = \mu_q + \sigma_q \epsilon^{(l)};

    ``kl="mc"`` is its eq. 26 estimated at the same draws,
    ``-1/L sum_l [log p(x|z_l) + log p(z_l) - log q(z_l|x)]``.
    (Odaibo, "Tutorial: Deriving the Standard Variational Autoencoder (VAE) Loss
    Function", 2019.) ``noise`` holds the L draws of epsilon, ``(L, batch, latent_dim)``.
    This is the independent reference the Pyro estimators are tested against: no Pyro
    and no ``torch.distributions`` KL.
    """
    x = vae.flatten(x)
    q_loc, q_scale = vae.encoder(x)
    p_loc, p_scale = vae.prior_loc, vae.prior_scale
    z = q_loc + q_scale * noise
    reconstruction = vae.likelihood(vae.decoder(z)).log_prob(x).sum(-1).mean(0)
    if kl == "analytic":
        neg_kl = (
            torch.log(q_scale / p_scale)
            - (q_scale**2 + (q_loc - p_loc) ** 2) / (2 * p_scale**2)
            + 0.5
        ).sum(-1)
    elif kl == "mc":
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        log_p = (-0.5 * ((z - p_loc) / p_scale) ** 2 - torch.log(p_scale) - half_log_2pi).sum(-1)
        log_q = (-0.5 * noise**2 - torch.log(q_scale) - half_log_2pi).sum(-1)
        neg_kl = (log_p - log_q).mean(0)
    else:
        raise UserInputError(f"kl must be 'analytic' or 'mc', got {kl!r}")
    return -(neg_kl + reconstruction)


# --------------------------------------------------------------------- log-weights
def log_importance_weights(vae, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``log p(x, z_k) - log q(z_k | x)`` for ``num_samples`` draws, ``(K, batch)``.

    Unscaled (no mini-batch or annealing scale): the weights of the model as defined.
    """
    model_trace, guide_trace = vectorized_traces(vae.model, vae.guide, x, num_samples)
    log_w = 0.0
    for site in sample_sites(model_trace):
        log_w = log_w + per_datapoint(site, site["fn"].log_prob(site["value"]), num_samples)
    for site in sample_sites(guide_trace):
        log_w = log_w - per_datapoint(site, site["fn"].log_prob(site["value"]), num_samples)
    return log_w
