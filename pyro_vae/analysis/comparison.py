"""The measurements behind ``pyro-vae compare``, and :class:`Comparison`, their result.

They take trained models and run records and return data: the summary over repeats
(means with 95% Student-t intervals over the seeds), the paired differences against a
baseline estimator, each trained model's own objective and gradient statistics, the
fitted log-log slopes of the gradient SNR against K and M beside Rainforth et al.'s
predictions, and the bounds against K of the first repeat's models. Training the
models and writing the tables and plots is the application's
(:mod:`pyro_vae.app.compare`, :mod:`pyro_vae.app.compare_report`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pyro_vae.analysis.bounds import bound_tightness
from pyro_vae.analysis.evaluation import evaluation_mode
from pyro_vae.analysis.gradients import estimator_gradient_statistics
from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import PyroModel, forked_rng, on_model_device
from pyro_vae.objectives.registry import Estimator, Option, estimator_spec

#: the level of every interval a comparison reports
CI_LEVEL = 0.95
#: how the estimators share the training budget (``budget=``): equal gradient steps,
#: equal samples of z per data point over the run, or equal wall-clock training time
BUDGETS = ("steps", "samples", "seconds")


@dataclasses.dataclass
class Comparison:
    """An equal-budget comparison of estimators: what ``comparison.json`` holds.

    ``summary``: one row per estimator (means, standard deviations and 95% t-interval
    half-widths over repeats); ``snr_versus_particles``: ``parameters_of`` (the estimator
    whose trained parameters were used) and ``rows`` (one per estimator and K, and per M
    for an estimator with an outer-sample option); ``bounds_versus_particles``: per
    estimator, the bounds against K; ``runs``: every (estimator, repeat) run's record;
    ``budget``: what the estimators shared (``kind``, one of :data:`BUDGETS`, and its
    numbers); ``paired_differences``: :func:`paired_differences` against ``baseline``;
    ``snr_slopes``: :func:`snr_slopes`.
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
    #: the budget the estimators shared: ``kind`` (one of :data:`BUDGETS`) and its numbers
    budget: dict[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "steps"})
    #: the estimator the paired differences are taken against
    baseline: str | None = None
    #: the level of the intervals (Student t over the seeds, n - 1 degrees of freedom)
    ci_level: float = CI_LEVEL
    paired_differences: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    snr_slopes: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``comparison.json`` (the fields, in this order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def t_quantile(level: float, dof: int) -> float:
    """The two-sided ``level`` quantile of Student's t with ``dof`` degrees of freedom
    (12.706 for 95% and 1 dof, 2.776 for 4, 1.960 in the limit)."""
    from scipy import stats

    if dof < 1:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, dof))


def t_interval(values: Sequence[float], level: float = CI_LEVEL) -> dict[str, float]:
    """Mean, sample standard deviation and the Student-t interval of the mean at
    ``level`` (n - 1 degrees of freedom): ``half_width``, ``low``, ``high``, all NaN for a
    single value (n = 1: no interval). NaN values are left out, and ``n`` counts the rest."""
    array = np.asarray(values, dtype=float)
    array = array[np.isfinite(array)]
    n = int(array.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "half_width": math.nan,
                "low": math.nan, "high": math.nan}  # fmt: skip
    mean = float(array.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": 0.0, "half_width": math.nan,
                "low": math.nan, "high": math.nan}  # fmt: skip
    std = float(array.std(ddof=1))
    half = t_quantile(level, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half,
            "low": mean - half, "high": mean + half}  # fmt: skip


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
    ("train_seconds", lambda r: r.get("train_seconds", float("nan"))),
    ("train_cpu_seconds", lambda r: r.get("train_cpu_seconds", float("nan"))),
    ("steps_taken", lambda r: float(r["steps"])),
    ("samples_per_point", lambda r: r.get("samples_per_point", float("nan"))),
)

#: the metrics of the paired differences against a baseline (each a summary field)
PAIRED_FIELDS = ("test_log_likelihood", "test_elbo", "encoder_snr", "decoder_snr")


#: averaged fields of measurements a comparison may leave out: in the summary when measured
OPTIONAL_SUMMARY_FIELDS: tuple[tuple[str, Callable[[Mapping[str, Any]], float]], ...] = (
    ("ais_log_likelihood", lambda r: r["evaluation"]["ais_log_likelihood"]),
)


def summarise(
    runs: Sequence[Mapping[str, Any]], estimators: Sequence[str], level: float = CI_LEVEL
) -> list[dict[str, Any]]:
    """One row per estimator: each of :data:`SUMMARY_FIELDS` (and of
    :data:`OPTIONAL_SUMMARY_FIELDS` measured in every run) as its mean, ``_std`` (the
    sample standard deviation over the seeds) and ``_ci`` (the half-width of the
    Student-t interval of the mean at ``level``; NaN with one seed)."""
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
            row[f"{field}_ci"] = t_interval([getter(r) for r in mine], level)["half_width"]
        rows.append(row)
    return rows


def _getter(field: str) -> Callable[[Mapping[str, Any]], float]:
    return dict((*SUMMARY_FIELDS, *OPTIONAL_SUMMARY_FIELDS))[field]


def paired_differences(
    runs: Sequence[Mapping[str, Any]],
    estimators: Sequence[str],
    baseline: str,
    fields: Sequence[str] = PAIRED_FIELDS,
    level: float = CI_LEVEL,
) -> list[dict[str, Any]]:
    """Per estimator other than ``baseline`` and per metric of ``fields``: the
    differences ``estimator - baseline`` seed by seed (each pair trained from the same
    initial parameters and data order), their mean and Student-t interval at ``level``
    (n - 1 degrees of freedom, n the seeds both have; NaN with one)."""
    by_seed = {(r["estimator"], r["seed"]): r for r in runs}
    base_seeds = [r["seed"] for r in runs if r["estimator"] == baseline]
    rows = []
    for name in estimators:
        if name == baseline:
            continue
        seeds = [s for s in base_seeds if (name, s) in by_seed]
        for field in fields:
            get = _getter(field)
            differences = [get(by_seed[name, s]) - get(by_seed[baseline, s]) for s in seeds]
            interval = t_interval(differences, level)
            rows.append(
                {
                    "estimator": name,
                    "baseline": baseline,
                    "metric": field,
                    "seeds": seeds,
                    "differences": differences,
                    **interval,
                }
            )
    return rows


# ------------------------------------------------------------------ budgets
#: names an estimator's option of outer samples M may have (MIWAE(M, K), PIWAE(M, K))
OUTER_OPTION_NAMES = ("outer", "M", "m", "num_outer", "outer_particles", "outer_samples")


def outer_option(spec: Estimator) -> Option | None:
    """The estimator's option of outer samples M (an integer option named as in
    :data:`OUTER_OPTION_NAMES`, or whose help speaks of outer samples), or ``None``."""
    integers = [o for o in spec.options if o.type is int]
    for name in OUTER_OPTION_NAMES:
        for option in integers:
            if option.name == name:
                return option
    return next((o for o in integers if "outer" in o.help.lower()), None)


def samples_per_step(spec: Estimator, particles: int, options: Mapping[str, Any]) -> int:
    """Samples of z each data point gets per gradient step: K (``particles``) times the
    outer samples M where the estimator has them (MIWAE(M, K): M x K), else K."""
    outer = outer_option(spec)
    if outer is None:
        return particles
    return particles * int(spec.resolve_options(options)[outer.name])


def samples_budget_steps(
    steps: int, particles: int, samples: int, steps_per_epoch: int
) -> tuple[int, int | None]:
    """Under the samples budget: the epochs and the step cap (``None``: whole epochs) of
    an estimator using ``samples`` per data point and step, when the budget is ``steps``
    steps of ``particles`` samples: ``steps * particles / samples`` steps (rounded down,
    at least one), so that each data point gets the same number of samples of z."""
    allowed = max(1, (steps * particles) // samples)
    epochs = math.ceil(allowed / steps_per_epoch)
    return epochs, None if allowed == epochs * steps_per_epoch else allowed


# ------------------------------------------------------------------ SNR slopes
#: Rainforth et al. (2018), "Tighter variational bounds are not necessarily better":
#: the SNR of each network's gradient grows like M^a K^b; per estimator, the exponent
#: of (group, "K" or "M"), with where it comes from
SNR_PREDICTIONS: dict[str, dict[tuple[str, str], tuple[float, str]]] = {
    "iwae": {
        ("encoder", "K"): (-0.5, "Rainforth et al. (2018): O(1/sqrt(K))"),
        ("decoder", "K"): (0.5, "Rainforth et al. (2018): O(sqrt(K))"),
    },
    "dreg": {
        ("decoder", "K"): (0.5, "Rainforth et al. (2018): IWAE's decoder gradient, O(sqrt(K))"),
    },
    "miwae": {
        ("encoder", "K"): (-0.5, "Rainforth et al. (2018): O(sqrt(M/K))"),
        ("encoder", "M"): (0.5, "Rainforth et al. (2018): O(sqrt(M/K))"),
        ("decoder", "K"): (0.5, "Rainforth et al. (2018): O(sqrt(MK))"),
        ("decoder", "M"): (0.5, "Rainforth et al. (2018): O(sqrt(MK))"),
    },
    "piwae": {
        ("encoder", "K"): (-0.5, "Rainforth et al. (2018): MIWAE's, O(sqrt(M/K))"),
        ("encoder", "M"): (0.5, "Rainforth et al. (2018): MIWAE's, O(sqrt(M/K))"),
        ("decoder", "K"): (0.5, "Rainforth et al. (2018): IWAE(MK)'s, O(sqrt(MK))"),
        ("decoder", "M"): (0.5, "Rainforth et al. (2018): IWAE(MK)'s, O(sqrt(MK))"),
    },
}


def loglog_slope(x: Sequence[float], y: Sequence[float], level: float = CI_LEVEL) -> dict[str, Any]:
    """The least-squares slope of ``log y`` against ``log x`` (points with positive,
    finite x and y), its standard error and Student-t interval (n - 2 degrees of
    freedom; NaN with two points, where a line fits exactly)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & (ys > 0)
    lx, ly = np.log(xs[keep]), np.log(ys[keep])
    n = int(keep.sum())
    nan = {"slope": math.nan, "se": math.nan, "low": math.nan, "high": math.nan, "points": n}
    if n < 2 or np.ptp(lx) == 0:
        return nan
    sxx = float(((lx - lx.mean()) ** 2).sum())
    slope = float(((lx - lx.mean()) * (ly - ly.mean())).sum() / sxx)
    if n == 2:
        return {**nan, "slope": slope}
    residuals = ly - ly.mean() - slope * (lx - lx.mean())
    se = math.sqrt(float((residuals**2).sum()) / (n - 2) / sxx)
    half = t_quantile(level, n - 2) * se
    return {"slope": slope, "se": se, "low": slope - half, "high": slope + half, "points": n}


def _plain_name(key: str) -> str:
    """An estimator's registered name (its key where no spec is found: the predictions
    are looked up by name, and a row may outlive a registration)."""
    try:
        return estimator_spec(key).name
    except UserInputError:
        return key


def snr_slopes(rows: Sequence[Mapping[str, Any]], level: float = CI_LEVEL) -> list[dict[str, Any]]:
    """Per estimator, network (encoder, decoder) and variable (K, or M where it was
    varied): the fitted log-log slope of the SNR (:func:`loglog_slope`), with Rainforth
    et al.'s predicted exponent where :data:`SNR_PREDICTIONS` has one."""
    slopes = []
    for name in dict.fromkeys(r["estimator"] for r in rows):
        for varied, key in (("K", "particles"), ("M", "outer")):
            mine = [r for r in rows if r["estimator"] == name and r.get("varied", "K") == varied]
            if len(mine) < 2:
                continue
            for group in ("encoder", "decoder"):
                fit = loglog_slope(
                    [r[key] for r in mine], [r.get(f"{group}_snr", math.nan) for r in mine], level
                )
                prediction = SNR_PREDICTIONS.get(_plain_name(name), {}).get((group, varied))
                slopes.append(
                    {
                        "estimator": name,
                        "group": group,
                        "varied": varied,
                        "values": [r[key] for r in mine],
                        "fixed": {
                            k: mine[0][k]
                            for k in ("particles", "outer")
                            if k != key and mine[0].get(k) is not None
                        },
                        **fit,
                        "predicted": None if prediction is None else prediction[0],
                        "source": None if prediction is None else prediction[1],
                    }
                )
    return slopes


def own_objective_and_gradients(
    vae: PyroModel,
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
