"""How tight is each bound? L_1, L_K for several K and log p(x), per data point."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import torch

from pyro_vae.models.protocol import PyroModel, as_batch
from pyro_vae.objectives.penalty import PenaltyObjective
from pyro_vae.objectives.registry import estimator_spec, make_elbo
from pyro_vae.objectives.terms import log_importance_weights


# ------------------------------------------------------------------ bounds
@torch.no_grad()
def bound_tightness(
    vae: PyroModel,
    x: torch.Tensor,
    particles: Sequence[int] = (1, 5, 50, 500),
    num_samples: int = 5000,
    penalty_particles: int = 10,
    estimators: Sequence[Any] = (),
    estimator_particles: int = 1,
) -> dict[str, Any]:
    """L_1 <= L_K <= log p(x), per data point, and the penalty objective beside them.

    ``estimators`` (names, import paths, :class:`~pyro_vae.objectives.registry.Estimator`
    or ELBO objects) add each one's own value with ``estimator_particles`` samples, as
    ``estimator_objectives[key]`` (nats per data point, the batch's mean; ``None`` for an
    estimator without a value) with ``estimator_minus_log_likelihood[key]``: above 0 for
    an estimator that claims to be a bound is a number that cannot be right.

    Returns means over the data points (nats per data point) and the per-point values:
    ``bounds[K]`` (one draw of L_K per point), ``log_likelihood`` (L with
    ``num_samples``), ``gap`` = log p(x) - L_1, and ``penalty`` (the seed question's
    objective) with the share of points where it exceeds log p(x) (impossible for a
    lower bound). Where the model knows its exact ``log_marginal`` (``pyro_vae.models.exact``),
    the exact log p(x) and ELBO are included. Runs with the networks in eval mode.
    """
    from pyro_vae.analysis.evaluation import evaluation_mode, log_likelihood

    # log p(x) is estimated with at least as many samples as the largest bound uses: a
    # bound L_K must never be shown above a log p(x) estimated from fewer than K samples
    num_samples = max(num_samples, *particles)
    x = as_batch(vae, x)
    with pyro.validation_enabled(False), evaluation_mode(vae):
        per_point: dict[int, torch.Tensor] = {}
        for k in particles:
            log_w = log_importance_weights(vae, x, k).double()
            per_point[k] = torch.logsumexp(log_w, 0) - math.log(k)
        log_px = log_likelihood(vae, x, num_samples)
        penalty = make_elbo("penalty", penalty_particles)
        assert isinstance(penalty, PenaltyObjective)  # what the registry's "penalty" builds
        value, _, _ = penalty.value_and_surrogate(vae.model, vae.guide, (x,), {})
    value = value.double()
    result: dict[str, Any] = {
        "particles": list(particles),
        "bound_means": [float(per_point[k].mean()) for k in particles],
        "log_likelihood": float(log_px.mean()),
        "log_likelihood_samples": num_samples,
        "gap_log_likelihood_minus_elbo": float((log_px - per_point[particles[0]]).mean())
        if particles[0] == 1
        else None,
        "penalty_objective": float(value.mean()),
        "penalty_minus_log_likelihood": float((value - log_px).mean()),
        "penalty_exceeds_log_likelihood_share": float((value > log_px).double().mean()),
        "per_point": {
            "log_likelihood": log_px.tolist(),
            "penalty": value.tolist(),
            **{f"L_{k}": per_point[k].tolist() for k in particles},
        },
    }
    if estimators:
        result["estimator_objectives"], result["estimator_minus_log_likelihood"] = {}, {}
        for estimator in estimators:
            key, value_of = _objective(vae, x, estimator, estimator_particles)
            result["estimator_objectives"][key] = value_of
            result["estimator_minus_log_likelihood"][key] = (
                None if value_of is None else value_of - result["log_likelihood"]
            )
    if hasattr(vae, "log_marginal") and hasattr(vae, "exact_elbo"):
        result["exact_log_marginal"] = float(vae.log_marginal(x).mean())
        result["exact_elbo"] = float(vae.exact_elbo(x).mean())
    return result


def _objective(
    vae: PyroModel, x: torch.Tensor, estimator: Any, particles: int
) -> tuple[str, float | None]:
    """An estimator's own value on ``x`` per data point (``None`` if it has none)."""
    from pyro_vae.analysis.evaluation import evaluation_mode

    spec = estimator_spec(estimator)
    if not spec.has_value:
        return spec.key, None
    elbo = spec.build(particles)
    with pyro.validation_enabled(False), evaluation_mode(vae), torch.no_grad():
        return spec.key, -elbo.loss(vae.model, vae.guide, x) / len(x)
