"""Importance-weighted bounds: IWAE's L_K (Burda et al., 2016), Renyi's VR bound (Li &
Turner, 2016), and the doubly reparameterized gradient of L_K (Tucker et al., 2019)."""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyro_vae.compat import values_trace
from pyro_vae.errors import UserInputError
from pyro_vae.objectives.traces import (
    ParticleELBO,
    check_reparameterized,
    data_scale,
    guide_log_prob_detached,
    log_weights,
    sample_sites,
    site_total,
    trace_log_density,
)


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log (1/K) sum_k exp(values_k)`` over ``dim`` (of size K): L_K from log-weights."""
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])


class LogWeightBound(ParticleELBO):
    """An objective that is a function of each data point's K log-weights
    (:meth:`bound`), with that function's reparameterised gradient: the value and the
    surrogate are the bound of the detached and of the live log-weights. IWAE, Renyi,
    MIWAE and CIWAE differ only in :meth:`bound`."""

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """The objective per data point from log-weights ``(K, batch)``."""
        raise NotImplementedError

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        log_w, scale = log_weights(model_trace, guide_trace, self.num_particles)
        return self.bound(log_w.detach()), self.bound(log_w), scale


class ImportanceWeightedELBO(LogWeightBound):
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

    def __init__(
        self, num_particles: int = 5, alpha: float = 0.0, max_plate_nesting: float | None = None
    ):
        if alpha == 1:
            raise ValueError("alpha = 1 is the ELBO: use Trace_ELBO")
        super().__init__(num_particles, max_plate_nesting)
        self.alpha = float(alpha)
        self.estimator = "iwae" if self.alpha == 0 else "renyi"

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """The bound per data point from log-weights ``(K, batch)``."""
        return log_mean_exp((1.0 - self.alpha) * log_w) / (1.0 - self.alpha)


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

    def __init__(self, num_particles: int = 5, max_plate_nesting: float | None = None):
        super().__init__(num_particles, alpha=0.0, max_plate_nesting=max_plate_nesting)
        self.estimator = "dreg"

    def value_and_surrogate(self, model, guide, args, kwargs):
        plate = self._plate(model, guide, args, kwargs)
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
        # the data scale of the model's trace, shared by the guide's terms
        scale = data_scale(model_trace)
        log_p = site_total(trace_log_density(model_trace, scale, self.num_particles))
        log_q = guide_log_prob_detached(
            guide,
            guide_trace,
            args,
            kwargs,
            self.num_particles,
            scale,
            self.max_plate_nesting,
            leaves,
        )
        log_w = log_p - log_q
        value = self.bound(log_w.detach())
        if not torch.is_grad_enabled():
            return value, value, scale
        weights = torch.softmax(log_w.detach(), 0)
        names = list(leaves)
        grads = torch.autograd.grad(
            (weights.pow(2) * log_w).sum(), [leaves[n] for n in names], retain_graph=True
        )
        batch = log_w.shape[-1]
        path = sum(
            (grad.detach() * samples[name]).reshape(self.num_particles, batch, -1).sum(-1)
            for name, grad in zip(names, grads)
        )
        surrogate = (weights * log_p).sum(0) + path.sum(0)
        return value, surrogate, scale


def iwae(num_particles: int, *, max_plate_nesting: float | None = None) -> ImportanceWeightedELBO:
    """``iwae``: L_K."""
    return ImportanceWeightedELBO(num_particles, alpha=0.0, max_plate_nesting=max_plate_nesting)


def renyi(
    num_particles: int, *, max_plate_nesting: float | None = None, alpha: float = 0.5
) -> ImportanceWeightedELBO:
    """``renyi``: the VR bound of order ``alpha`` (1 is the ELBO: refused)."""
    if alpha == 1:
        raise UserInputError("renyi with alpha = 1 is the ELBO: use the 'mc' estimator")
    return ImportanceWeightedELBO(num_particles, alpha=alpha, max_plate_nesting=max_plate_nesting)


def dreg(num_particles: int, *, max_plate_nesting: float | None = None) -> DReGELBO:
    """``dreg``: L_K with the doubly reparameterized gradient."""
    return DReGELBO(num_particles, max_plate_nesting)
