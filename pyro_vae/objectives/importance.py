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
    _data_scale,
    check_reparameterized,
    guide_log_prob_detached,
    log_weights,
    particle_plate,
    per_datapoint,
    sample_sites,
)


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
        log_p: torch.Tensor | float = 0.0
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


def iwae(num_particles: int, alpha: float, max_plate_nesting: int) -> ImportanceWeightedELBO:
    """``iwae``: L_K."""
    return ImportanceWeightedELBO(num_particles, alpha=0.0, max_plate_nesting=max_plate_nesting)


def renyi(num_particles: int, alpha: float, max_plate_nesting: int) -> ImportanceWeightedELBO:
    """``renyi``: the VR bound of order ``alpha`` (1 is the ELBO: refused)."""
    if alpha == 1:
        raise UserInputError("renyi with alpha = 1 is the ELBO: use the 'mc' estimator")
    return ImportanceWeightedELBO(num_particles, alpha=alpha, max_plate_nesting=max_plate_nesting)


def dreg(num_particles: int, alpha: float, max_plate_nesting: int) -> DReGELBO:
    """``dreg``: L_K with the doubly reparameterized gradient."""
    return DReGELBO(num_particles, max_plate_nesting)
