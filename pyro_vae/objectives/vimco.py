r"""``vimco``: the IWAE bound with the leave-one-out score-function gradient, per data point.

Mnih & Rezende, "Variational Inference for Monte Carlo Objectives" (2016). With K draws
``z_k ~ q_phi(z|x)`` carrying no gradient (any guide:
:class:`~pyro_vae.objectives.traces.DetachedDraws`) and log-weights
``log w_k = log p_theta(x, z_k) - log q_phi(z_k|x)``, per data point:

.. math::
    L_K = \log \frac1K \sum_k w_k, \qquad
    L_{-k} = \log \frac1K \Big(\sum_{j \ne k} w_j + \hat w_{-k}\Big), \quad
    \log \hat w_{-k} = \frac{1}{K-1} \sum_{j \ne k} \log w_j,

.. math::
    \hat\nabla = \sum_k \tilde w_k \nabla \log w_k
        + \sum_k (L_K - L_{-k})\, \nabla_\phi \log q_\phi(z_k|x),
    \qquad \tilde w_k = w_k / \textstyle\sum_j w_j.

``L_{-k}`` (the geometric mean of the other weights standing in for ``w_k``) does not
depend on ``z_k``, so each learning signal ``L_K - L_{-k}`` is baselined without bias.
The value is L_K of the same draws as ``iwae`` (same noise, same value). With one
particle there is no other to leave out: the signal is ``L_1`` itself, and the estimator
is ``score``.
"""

from __future__ import annotations

import math

import torch

from pyro_vae.objectives.importance import log_mean_exp
from pyro_vae.objectives.score import leave_one_out_mean
from pyro_vae.objectives.traces import ParticleELBO, log_weights, score_log_density


def leave_one_out_bounds(log_w: torch.Tensor) -> torch.Tensor:
    """``L_{-k}`` for each particle ``(K, batch)`` from log-weights ``(K, batch)``: the
    bound with ``w_k`` replaced by the geometric mean of the others; zeros with one
    particle."""
    count = log_w.shape[0]
    if count == 1:
        return torch.zeros_like(log_w)
    stand_in = leave_one_out_mean(log_w)  # log of the geometric mean of the others
    own = torch.eye(count, dtype=torch.bool, device=log_w.device).unsqueeze(-1)
    # row k: the log-weights with the k-th replaced by its stand-in
    rows = torch.where(own, stand_in.unsqueeze(1), log_w.unsqueeze(0))
    return torch.logsumexp(rows, 1) - math.log(count)


class VIMCO(ParticleELBO):
    """L_K with VIMCO's gradient (see the module's docstring)."""

    estimator = "vimco"
    detached_draws = True

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        log_w, scale = log_weights(model_trace, guide_trace, self.num_particles)
        log_q = score_log_density(guide_trace, self.num_particles)
        bound = log_mean_exp(log_w)
        value = bound.detach()
        signal = value - leave_one_out_bounds(log_w.detach())
        return value, bound + (signal * log_q).sum(0), scale


def vimco(num_particles: int, *, max_plate_nesting: float | None = None) -> VIMCO:
    """``vimco``: L_K with the leave-one-out score-function gradient."""
    return VIMCO(num_particles, max_plate_nesting)
