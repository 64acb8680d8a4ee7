"""Which estimators' losses are tensor operations only, and those losses as functions.

A graph can be captured only from a loss that is the same tensor operations every step.
:func:`traceable_loss` decides per estimator: this project's static estimators and
Pyro's ``Trace_ELBO`` family (a subclass too, as long as it overrides none of the methods
its loss is made of), or what a registration declares with
``capture="differentiable_loss"``; anything else (an estimator that switches on a tensor
value, like :class:`~pyro_vae.objectives.free_bits.FreeBitsELBO`) runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample

from pyro_vae import compat
from pyro_vae.compat import NotCompilable
from pyro_vae.objectives.closed_form import ClosedFormKL_ELBO, TraceELBO
from pyro_vae.objectives.importance import DReGELBO, ImportanceWeightedELBO
from pyro_vae.objectives.path import StickingTheLandingELBO
from pyro_vae.objectives.penalty import PenaltyObjective
from pyro_vae.objectives.registry import Objective
from pyro_vae.objectives.traces import site_total

__all__ = ["traceable_loss"]


def reparameterized_trace_elbo(model_trace, guide_trace) -> torch.Tensor:
    """One particle of ``Trace_ELBO`` for a reparameterized guide, without host syncs.

    ``sum log p(x, z) - sum log q(z|x)`` over the traces' sample sites (scaled by the data
    plate), exactly ``Trace_ELBO``'s surrogate, whose value then equals its ELBO; Pyro's
    version also converts the value to a float (``.item()``), which a captured graph
    cannot replay.
    """
    value: torch.Tensor | float = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            value = value + site["log_prob_sum"]
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            if not site["fn"].has_rsample:
                raise NotCompilable(
                    f"guide site {site['name']!r} is not reparameterized: its "
                    f"score-function term needs the eager Trace_ELBO"
                )
            value = value - site["log_prob_sum"]
    return site_total(value)


#: the methods that make up a Trace_ELBO-family loss: a subclass that overrides one of
#: them computes something else, and is not captured as its base class
_TRACE_ELBO_METHODS = (
    "differentiable_loss",
    "loss",
    "loss_and_grads",
    "_differentiable_loss_particle",
    "_get_trace",
    "_get_traces",
    "_get_vectorized_trace",
    "differentiable_elbo_particle",
)
#: this project's estimators whose differentiable_loss is tensor operations only
_STATIC_PARTICLE_ELBOS = (
    ImportanceWeightedELBO,
    StickingTheLandingELBO,
    DReGELBO,
    PenaltyObjective,
)
#: the methods a ParticleELBO subclass defines its loss with
_PARTICLE_METHODS = (
    "differentiable_loss",
    "value_and_surrogate",
    "_elbo_and_surrogate",
    "bound",
    "_get_trace",
    "_get_traces",
    "_plate",
)


def _overridden(elbo: Any, base: type, methods: tuple[str, ...]) -> list[str]:
    """The methods of ``methods`` that ``type(elbo)`` defines differently from ``base``."""
    kind = type(elbo)
    return [m for m in methods if getattr(kind, m, None) is not getattr(base, m, None)]


def traceable_loss(elbo: Objective, capture: str = "auto") -> tuple[Callable | None, str | None]:
    """``(loss, None)``: the ELBO's differentiable loss ``(model, guide, *args, **kwargs)
    -> loss`` as tensor operations only; or ``(None, why)`` for an estimator not known to
    be static, which then runs eagerly.

    :param capture: the estimator's policy (see
        :data:`~pyro_vae.objectives.registry.CAPTURE_POLICIES`): ``"auto"`` decides by
        class (a subclass of a known estimator is captured as its base when it overrides
        none of the methods its loss is made of); ``"differentiable_loss"`` captures the
        ELBO's own ``differentiable_loss`` (checked against the eager loss when the graph
        is built); ``"never"`` is always eager.
    """
    if capture == "never":
        return None, f"{type(elbo).__name__} asks never to be captured"
    if capture == "differentiable_loss":
        return elbo.differentiable_loss, None
    base: type
    for base in (TraceELBO, ClosedFormKL_ELBO, Trace_ELBO):
        if type(elbo) is base or (
            isinstance(elbo, base) and not _overridden(elbo, base, _TRACE_ELBO_METHODS)
        ):
            return _trace_elbo_loss(elbo), None
    for base in _STATIC_PARTICLE_ELBOS:
        if type(elbo) is base or (
            isinstance(elbo, base) and not _overridden(elbo, base, _PARTICLE_METHODS)
        ):
            return elbo.differentiable_loss, None  # (a ParticleELBO's)
    kind = type(elbo).__name__
    for base in (Trace_ELBO, *_STATIC_PARTICLE_ELBOS):
        if isinstance(elbo, base):
            changed = _overridden(elbo, base, _TRACE_ELBO_METHODS + _PARTICLE_METHODS)
            return None, (
                f"{kind} overrides {', '.join(changed)} of {base.__name__}; if its loss is "
                f"tensor operations only, register it with capture='differentiable_loss'"
            )
    return None, (
        f"{kind} is not an estimator known to be static; if its differentiable_loss is "
        f"tensor operations only, register it with capture='differentiable_loss'"
    )


def _trace_elbo_loss(elbo: Any) -> Callable:
    if isinstance(elbo, ClosedFormKL_ELBO):
        particle = elbo.differentiable_elbo_particle
    else:
        particle = reparameterized_trace_elbo

    def loss(model, guide, *args, **kwargs):
        total: torch.Tensor | float = 0.0
        for model_trace, guide_trace in compat.elbo_traces(elbo, model, guide, args, kwargs):
            total = total - particle(model_trace, guide_trace) / elbo.num_particles
        return total

    return loss
