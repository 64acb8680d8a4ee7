"""The measurements behind ``pyro-vae compare``, and :class:`Comparison`, their result.

They take trained models and run records and return data: the summary over repeats,
each trained model's own objective and gradient statistics, and the bounds against K
of the first repeat's models. Training the models and writing the tables and plots is
the application's (:mod:`pyro_vae.app.compare`, :mod:`pyro_vae.app.compare_report`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pyro_vae.analysis.bounds import bound_tightness
from pyro_vae.analysis.evaluation import evaluation_mode
from pyro_vae.analysis.gradients import estimator_gradient_statistics
from pyro_vae.models.protocol import forked_rng, on_model_device
from pyro_vae.objectives.registry import estimator_spec


@dataclasses.dataclass
class Comparison:
    """An equal-budget comparison of estimators: what ``comparison.json`` holds.

    ``summary``: one row per estimator (means and standard deviations over repeats);
    ``snr_versus_particles``: ``parameters_of`` (the estimator whose trained parameters
    were used) and ``rows``; ``bounds_versus_particles``: per estimator, the bounds
    against K; ``runs``: every (estimator, repeat) run's record.
    """

    command: str
    config: dict[str, Any]
    estimators: list[str]
    repeats: int
    eval_samples: int
    eval_points: int
    bound_points: int
    grad_draws: int
    grad_batch: int
    executor: str
    runs_wall_seconds: float
    summary: list[dict[str, Any]]
    snr_versus_particles: dict[str, Any]
    bounds_versus_particles: dict[str, dict[str, Any]]
    runs: list[dict[str, Any]]
    #: T of the AIS log p(x) beside IS (``None``: not measured)
    ais_steps: int | None = None
    #: numbers that cannot be right (:func:`~pyro_vae.analysis.sanity.comparison_flags`),
    #: each as :meth:`~pyro_vae.analysis.sanity.Flag.to_dict`
    flags: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``comparison.json`` (the fields, in this order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _group(field: str, group: str) -> Callable[[Mapping[str, Any]], float]:
    return lambda r: r["gradients"].get(group, {}).get(field, float("nan"))


#: the summary's averaged fields, each read from a run record
SUMMARY_FIELDS: tuple[tuple[str, Callable[[Mapping[str, Any]], float]], ...] = (
    ("test_elbo", lambda r: r["evaluation"]["test_elbo"]),
    ("test_log_likelihood", lambda r: r["evaluation"]["test_log_likelihood"]),
    ("test_objective", lambda r: r["test_objective"]),
    ("objective_minus_log_likelihood", lambda r: r["objective_minus_log_likelihood"]),
    ("encoder_snr", _group("snr_mean", "encoder")),
    ("decoder_snr", _group("snr_mean", "decoder")),
    ("encoder_variance", _group("variance", "encoder")),
    ("decoder_variance", _group("variance", "decoder")),
    ("shared_snr", _group("snr_mean", "shared")),
    ("shared_variance", _group("variance", "shared")),
    ("active_units", lambda r: r["evaluation"]["active_units"]),
    ("informative_units", lambda r: r["evaluation"].get("informative_units", float("nan"))),
    ("seconds_per_epoch", lambda r: r["seconds_per_epoch"]),
    ("cpu_seconds_per_epoch", lambda r: r.get("cpu_seconds_per_epoch", float("nan"))),
)


#: averaged fields of measurements a comparison may leave out: in the summary when measured
OPTIONAL_SUMMARY_FIELDS: tuple[tuple[str, Callable[[Mapping[str, Any]], float]], ...] = (
    ("ais_log_likelihood", lambda r: r["evaluation"]["ais_log_likelihood"]),
)


def summarise(runs: Sequence[Mapping[str, Any]], estimators: Sequence[str]) -> list[dict[str, Any]]:
    """One row per estimator: each of :data:`SUMMARY_FIELDS` (and of
    :data:`OPTIONAL_SUMMARY_FIELDS` measured in every run) as mean and ``_std``."""
    rows = []
    for name in estimators:
        mine = [r for r in runs if r["estimator"] == name]
        row: dict[str, Any] = {
            "estimator": name,
            "repeats": len(mine),
            "particles": mine[0]["particles"],
            "epochs": mine[0]["epochs"],
            "steps": mine[0]["steps"],
        }
        measured = [
            (field, getter)
            for field, getter in OPTIONAL_SUMMARY_FIELDS
            if all(field in r["evaluation"] for r in mine)
        ]
        for field, getter in (*SUMMARY_FIELDS, *measured):
            mean, std = mean_std([getter(r) for r in mine])
            row[field] = mean
            row[f"{field}_std"] = std
        rows.append(row)
    return rows


def own_objective_and_gradients(
    vae,
    x: torch.Tensor,
    grad_x: torch.Tensor,
    estimator: Any,
    particles: int,
    grad_draws: int,
    options: Mapping[str, Any] | None,
    seed: int,
) -> tuple[float, dict[str, Any]]:
    """A trained model's own objective per data point on ``x`` and its estimator's
    gradient statistics on ``grad_x``: eval mode, seeded, the global RNG untouched. For
    an estimator without a value (a surrogate only) the objective is the Monte Carlo
    ELBO with the same K (:attr:`~pyro_vae.objectives.registry.Estimator.has_value`)."""
    x = on_model_device(vae, x)
    spec = estimator_spec(estimator)
    valued = spec if spec.has_value else estimator_spec("mc")
    with forked_rng(), evaluation_mode(vae):
        torch.manual_seed(seed)
        elbo = valued.build(particles, options=options if spec.has_value else None)
        objective = -elbo.loss(vae.model, vae.guide, x) / len(x)
        gradients = estimator_gradient_statistics(
            vae, grad_x, spec, particles, grad_draws, options=options
        )
    return objective, gradients


def bounds_versus_particles(
    models: Mapping[str, Any],
    x: torch.Tensor,
    particles: Sequence[int],
    num_samples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """:func:`~pyro_vae.analysis.bounds.bound_tightness` of each model (means only, the
    per-point values dropped), each from the same seed, the global RNG untouched."""
    bounds = {}
    for name, vae in models.items():
        with forked_rng():
            torch.manual_seed(seed)
            bounds[name] = bound_tightness(vae, x, particles, num_samples)
            bounds[name].pop("per_point")
    return bounds
