"""Comparing estimators: gradient variance and SNR, bound tightness, equal-budget training.

- :func:`~pyro_vae.analysis.gradients.gradient_draws` /
  :func:`~pyro_vae.analysis.gradients.gradient_statistics`: M gradient estimates with fresh
  noise at fixed parameters and a fixed mini-batch; per parameter group (encoder: the
  guide's parameters, decoder: the model's) the total variance, the mean per-parameter
  signal-to-noise ratio ``|mean| / std`` (Rainforth et al., "Tighter Variational Bounds
  are Not Necessarily Better", 2018) and, given a reference gradient, the bias.
- :func:`~pyro_vae.analysis.bounds.bound_tightness`: per data point L_1 (the ELBO), L_K
  for several K, the importance-sampled log p(x), their gaps, and the penalty objective
  next to them.
- :func:`compare_estimators`: trains one model per estimator from the same initial
  parameters and data order on an equal budget (gradient steps, samples of z per data
  point, or wall-clock seconds), evaluates all with the same K, and writes
  ``comparison.json``, ``.csv``, ``.md`` and plots: means with 95% t-intervals over the
  seeds, paired differences against a baseline estimator, and the SNR's slopes against
  K and M beside Rainforth et al.'s predictions.

This module orchestrates: :func:`run_comparison` checks everything, trains the runs
(:mod:`pyro_vae.app.compare_runs`, through an executor, each in its own run folder) and
returns a :class:`~pyro_vae.analysis.comparison.Comparison`
measured by :mod:`pyro_vae.analysis.comparison`; :mod:`pyro_vae.app.compare_report`
renders it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pyro_vae.analysis.comparison import (
    Comparison,
    paired_differences,
    snr_slopes,
    summarise,
)
from pyro_vae.analysis.sanity import comparison_flags
from pyro_vae.app.compare_checks import (
    baseline_key,
    check_budget,
    check_options,
    checked_data,
    checked_pool,
    parse_estimators,
)
from pyro_vae.app.compare_report import markdown_table, write_comparison
from pyro_vae.app.compare_runs import (
    bounds_section,
    budget_of,
    first_repeat_models,
    run_specs,
    snr_section,
    train_runs,
    unspent_time,
)
from pyro_vae.app.training_run import DataCache
from pyro_vae.errors import UserInputError
from pyro_vae.imports import import_path_of
from pyro_vae.objectives.registry import (
    estimator_spec,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pyro_vae.config import RunConfig

__all__ = [
    "Comparison",
    "ComparisonSettings",
    "as_run_config",
    "compare_estimators",
    "markdown_table",
    "run_comparison",
]


def as_run_config(config: Any) -> RunConfig:
    """A :class:`~pyro_vae.config.RunConfig`, or a model factory (a callable taking the
    data shape, or its import path) made into the default one with that model."""
    from pyro_vae.config import ModelConfig, RunConfig

    if isinstance(config, RunConfig):
        return config
    if isinstance(config, str) or callable(config):
        path = config if isinstance(config, str) else import_path_of(config)
        if path is None:
            raise UserInputError(
                f"model factory {getattr(config, '__qualname__', config)!r} has no import path "
                f"(defined in __main__ or inside a function): define it in a module, so that "
                f"every run (and its run folder) can rebuild it"
            )
        return RunConfig(model=ModelConfig(factory=path))
    raise UserInputError(
        f"compare takes a RunConfig or a model factory, got {type(config).__name__}"
    )


class ComparisonSettings(TypedDict, total=False):
    """The keywords of :func:`compare_estimators`: those of :func:`run_comparison`."""

    repeats: int
    eval_samples: int
    eval_points: int | None
    grad_draws: int
    grad_batch: int
    snr_particles: Sequence[int]
    bound_particles: Sequence[int]
    bound_points: int
    progress: bool
    log: Callable[[str], None] | None
    command: str
    executor: Any
    ais_steps: int | None
    budget: str
    budget_seconds: float | None
    baseline: Any
    snr_outer: Sequence[int]
    estimator_options: Mapping[str, Any] | None


def compare_estimators(
    config: Any,
    estimators: Sequence[Any],
    out_dir: str | Path,
    **settings: Unpack[ComparisonSettings],
) -> dict[str, Any]:
    """Train one model per estimator and repeat, on an equal budget, and compare them.

    ``config`` is a :class:`~pyro_vae.config.RunConfig` or a model factory (a callable
    taking the data shape and returning a model the protocol accepts, or its import
    path): each seed builds the model once, and every estimator starts from a copy of
    its parameters. ``estimators`` are names, import paths, :class:`Estimator` or ELBO
    objects; ``config.train.estimator_options``, and ``estimator_options`` given to
    :func:`run_comparison` (options of several estimators, which no one ``TrainConfig``
    takes), apply to each estimator that has them.

    Every estimator starts from the same initial parameters (per repeat) and sees the
    data in the same order, with the same number of particles K
    (``config.train.particles``); ``budget`` says what else they share:

    - ``"steps"`` (the default): the same number of gradient steps, ``config.train.epochs``
      epochs each;
    - ``"samples"``: the same number of samples of z per data point over the run,
      ``epochs x K``. An estimator drawing ``s`` samples per data point and step (K, or
      M x K for one with an outer-sample option M, as MIWAE(M, K)) takes
      ``floor(steps x K / s)`` steps (:func:`~pyro_vae.analysis.comparison.samples_per_step`);
    - ``"seconds"``: the same wall-clock training time, ``budget_seconds`` per run (the
      per-epoch evaluations not counted; ``config.train.epochs`` is then a cap). The
      steps each run reached are recorded, with its CPU time: wall time depends on the
      machine's load, so such a comparison is only as fair as the machine was quiet.

    Each trained model is evaluated with the same K (``eval_samples``) for log p(x), and
    its own gradient estimator is measured at its final parameters on a fixed mini-batch.

    Each (estimator, repeat) is one call of
    :func:`~pyro_vae.app.compare_runs.train_compare_run`, which trains into
    its own folder ``out_dir/runs/ESTIMATOR-seedSEED`` with checkpoints; ``executor``
    (:mod:`pyro_vae.app.executors`; default: serial, in this process, one torch thread per
    run as on a default Ray task) decides where the calls run. The results, tables and
    plots do not depend on it, bit for bit on CPU.

    Every table gives the mean over the seeds with its 95% Student-t interval (n - 1
    degrees of freedom; none with one seed); the differences of each metric against
    ``baseline`` (default: the first estimator) are taken seed by seed, between runs
    from the same initial parameters, and given with their own interval.

    ``settings`` are those of :func:`run_comparison` (repeats, budget, budget_seconds,
    baseline, eval_samples, grad_draws, particles and outer samples of the SNR study and
    particles of the bound study, progress, log, command, executor), which
    trains and measures (returning a :class:`~pyro_vae.analysis.comparison.Comparison`);
    :func:`~pyro_vae.app.compare_report.write_comparison` writes ``comparison.json``,
    ``.csv``, ``.md`` and the plots; this returns the JSON's dict.
    """
    comparison = run_comparison(config, estimators, out_dir, **settings)
    write_comparison(Path(out_dir), comparison)
    return comparison.to_dict()


def run_comparison(
    config: Any,
    estimators: Sequence[Any],
    out_dir: str | Path,
    repeats: int = 1,
    eval_samples: int = 1000,
    eval_points: int | None = None,
    grad_draws: int = 100,
    grad_batch: int = 100,
    snr_particles: Sequence[int] = (1, 3, 10, 30),
    bound_particles: Sequence[int] = (1, 5, 50, 500),
    bound_points: int = 200,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    command: str = "",
    executor: Any = None,
    ais_steps: int | None = None,
    budget: str = "steps",
    budget_seconds: float | None = None,
    baseline: Any = None,
    snr_outer: Sequence[int] = (1, 2, 4, 8),
    estimator_options: Mapping[str, Any] | None = None,
) -> Comparison:
    """The comparison of :func:`compare_estimators` as data: trains the runs into
    ``out_dir/runs`` (their run folders are all it writes), measures the trained models
    and returns the :class:`~pyro_vae.analysis.comparison.Comparison`; no report.
    ``ais_steps``: also log p(x) by AIS with that many steps (16 chains, 5 leapfrog steps)
    on the same test points, beside the importance-sampled one. ``budget``,
    ``budget_seconds``, ``baseline``: see :func:`compare_estimators`. ``snr_outer``: the
    values of M at which the SNR of an estimator with an outer-sample option is measured
    (K fixed at ``config.train.particles``), beside ``snr_particles``, the values of K.
    ``estimator_options``: options over ``config.train.estimator_options``, each applied
    to the estimators that take it (``{"alpha": 0.3, "outer": 8}`` for renyi and miwae)."""
    config = as_run_config(config)
    estimators = parse_estimators(estimators)
    check_budget(budget, budget_seconds)
    baseline = baseline_key(baseline, estimators)
    pool = checked_pool(config, estimators, estimator_options, snr_outer, executor, ais_steps)
    check_options(config, repeats, eval_samples, grad_draws, snr_particles, bound_particles)
    executor = _serial_unless(executor)
    cache = DataCache()  # (this comparison's: its runs in this process read the data once)
    data, test_images = checked_data(config, eval_points, cache, estimators, pool)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    measurements = _measurements(config, eval_samples, eval_points, grad_draws, grad_batch)
    measurements["ais_steps"] = ais_steps
    shared = budget_of(config, estimators, budget, budget_seconds, len(data.train), pool)
    specs, labels = run_specs(
        config,
        estimators,
        Path(out_dir) / "runs",
        repeats,
        measurements,
        progress=progress and executor.name == "serial",
        data_shape=data.data_shape,
        budget=shared,
        options=pool,
    )
    runs, runs_wall_seconds = train_runs(executor, specs, labels, log, eval_samples, cache)
    if log is not None:
        for line in unspent_time(runs, shared):
            log(f"warning: {line}")
    trained = first_repeat_models(runs, config, data.data_shape)  # on config.train.device
    grad_images, bound_images = test_images[:grad_batch], test_images[:bound_points]
    snr = snr_section(
        trained, estimators, grad_images, snr_particles, snr_outer, grad_draws, config, log, pool
    )
    bounds = bounds_section(trained, bound_images, bound_particles, eval_samples, config, log)
    summary = summarise(runs, estimators)
    flags = _flags(summary, estimators, config, log)
    return Comparison(
        command=command,
        # (with the options of the estimators compared, which no one TrainConfig holds)
        config=_with_options(config.to_dict(), pool),
        estimators=estimators,
        repeats=repeats,
        eval_samples=eval_samples,
        eval_points=int(len(test_images)),
        bound_points=int(len(bound_images)),
        grad_draws=grad_draws,
        grad_batch=int(len(grad_images)),
        executor=executor.name,
        runs_wall_seconds=runs_wall_seconds,
        summary=summary,
        snr_versus_particles=snr,
        bounds_versus_particles=bounds,
        runs=runs,
        ais_steps=ais_steps,
        flags=[flag.to_dict() for flag in flags],
        budget=shared,
        baseline=baseline,
        paired_differences=paired_differences(runs, estimators, baseline),
        snr_slopes=snr_slopes(snr["rows"]),
    )


def _measurements(
    config: Any, eval_samples: int, eval_points: int | None, grad_draws: int, grad_batch: int
) -> dict[str, Any]:
    """What each run measures after training (its spec's fields)."""
    return {
        "eval_samples": eval_samples,
        "eval_points": eval_points,
        "grad_draws": grad_draws,
        "grad_batch": grad_batch,
        "compile_evaluation": _compile_evaluation(config),
    }


def _flags(
    summary: Any, estimators: Sequence[str], config: Any, log: Callable[[str], None] | None
) -> list[Any]:
    """The summary's numbers that cannot be right, each logged as a warning."""
    flags = comparison_flags(
        summary,
        binary=config.model.likelihood == "bernoulli",
        bounds=[name for name in estimators if estimator_spec(name).is_bound],
    )
    if log is not None:
        for flag in flags:
            log(f"warning: {flag.message()}")
    return flags


def _with_options(config: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    config["train"]["estimator_options"] = dict(options)
    return config


def _serial_unless(executor: Any) -> Any:
    """``executor``, or the serial one (in this process) when none is given."""
    if executor is not None:
        return executor
    from pyro_vae.app.executors import SerialExecutor

    return SerialExecutor()


def _compile_evaluation(config: RunConfig) -> bool | None:
    """Whether evaluation runs through captured graphs (``None``: decided by the work)."""
    return None if config.train.compile == "auto" else bool(config.train.compile)
