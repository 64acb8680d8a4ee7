"""``analytic``: the ELBO with the closed-form Gaussian KL (Pyro's TraceMeanField_ELBO),
refused where the closed form is not the model's KL."""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from pyro_vae.objectives.traces import _log_prob_sum, find_plate_nesting, site_total


class _PlateNestingFound:
    """Pyro's ``max_plate_nesting`` guess (one run of the model and guide, made when the
    first step needs it), drawn from a forked random stream: finding the nesting takes no
    noise from the caller's steps, so an estimator that finds it and one that is told it
    train on the same draws."""

    max_plate_nesting: float
    num_particles: int

    def _guess_max_plate_nesting(self, model, guide, args, kwargs):
        nesting = find_plate_nesting(model, guide, args, kwargs)
        # (Pyro's ELBO counts its particle plate in max_plate_nesting)
        vectorized = getattr(self, "vectorize_particles", False) and self.num_particles > 1
        self.max_plate_nesting = nesting + int(vectorized)


class TraceELBO(_PlateNestingFound, Trace_ELBO):
    """:class:`pyro.infer.Trace_ELBO` (``mc``), finding its plate nesting in a forked
    random stream; otherwise Pyro's class, unchanged."""


class ClosedFormKL_ELBO(_PlateNestingFound, TraceMeanField_ELBO):
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
        elbo: torch.Tensor | float = 0.0
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
        return site_total(elbo)


def _nesting(max_plate_nesting: float | None) -> float:
    return float("inf") if max_plate_nesting is None else max_plate_nesting


def trace_elbo(num_particles: int, *, max_plate_nesting: float | None = None) -> Trace_ELBO:
    """``mc``: Pyro's Trace_ELBO, particles vectorized."""
    return TraceELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=_nesting(max_plate_nesting),
    )


def closed_form_elbo(num_particles: int, *, max_plate_nesting: float | None = None) -> ELBO:
    """``analytic``: :class:`ClosedFormKL_ELBO`, particles vectorized."""
    return ClosedFormKL_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=_nesting(max_plate_nesting),
    )
