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

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from pyro_vae.analysis.comparison import (
    BUDGETS,
    Comparison,
    paired_differences,
    snr_slopes,
    summarise,
)
from pyro_vae.analysis.sanity import comparison_flags
from pyro_vae.app.compare_report import markdown_table, write_comparison
from pyro_vae.app.compare_runs import (
    bounds_section,
    budget_of,
    estimator_options_for,
    first_repeat_models,
    run_specs,
    snr_section,
    train_runs,
    unspent_time,
)
from pyro_vae.errors import UserInputError
from pyro_vae.imports import import_path_of, is_import_path
from pyro_vae.models.protocol import private_param_store
from pyro_vae.objectives.registry import (
    BUILT_IN,
    ESTIMATORS,
    check_estimator_fits,
    estimator_spec,
)
from pyro_vae.resources import check_device

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pyro_vae.config import RunConfig
    from pyro_vae.models.protocol import PyroModel

__all__ = [
    "Comparison",
    "ComparisonSettings",
    "as_run_config",
    "check_estimators_run",
    "compare_estimators",
    "markdown_table",
    "parse_estimators",
    "run_comparison",
]


# ------------------------------------------------------------------ equal-budget training
def parse_estimators(text: str | Sequence[Any]) -> list[str]:
    """The keys (names or import paths) of the estimators in ``"mc,pkg.mod:Name"`` or a
    list of names, import paths, :class:`~pyro_vae.objectives.registry.Estimator` or
    ELBO objects, each given once; an unknown or repeated one is refused in one line.

    An object that no import path names (a class defined in a notebook) is registered
    under its name in this process, so that a serial comparison runs it; another
    process cannot rebuild it (see :func:`check_executor_reaches`).
    """
    items = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    items = [n for n in items if not (isinstance(n, str) and not n)]
    if not items:
        raise UserInputError(
            f"no estimator given: choose from {', '.join(ESTIMATORS)} or give import paths"
        )
    keys = []
    for item in items:
        spec = estimator_spec(item)
        if spec.path is None and ESTIMATORS.get(spec.name) is not spec:
            if spec.name in ESTIMATORS:
                raise UserInputError(
                    f"estimator {spec.name!r} is a Python object whose name is taken: give it "
                    f"another name (Estimator(name=...)) or an import path"
                )
            ESTIMATORS[spec.name] = spec  # (this process only)
        keys.append(spec.key)
    if len(set(keys)) != len(keys):
        raise UserInputError(f"an estimator is listed twice in {', '.join(keys)}")
    return keys


def check_executor_reaches(estimators: Sequence[str], executor: Any) -> None:
    """Refuse, in one line, an estimator only this process knows when the runs train
    elsewhere (Ray workers import estimators by name or import path)."""
    if executor is None or executor.name == "serial":
        return
    local = [k for k in estimators if k not in BUILT_IN and not is_import_path(k)]
    if local:
        raise UserInputError(
            f"estimator(s) {', '.join(local)} exist only in this process, and the "
            f"{executor.name} executor trains in others: give each as an import path "
            f"package.module:Name"
        )


def _check_options_used(estimators: Sequence[str], options: Mapping[str, Any]) -> None:
    taken = {o.name for key in estimators for o in estimator_spec(key).options}
    unused = sorted(set(options) - taken)
    if unused:
        raise UserInputError(
            f"no estimator compared takes the option(s) {', '.join(unused)}: "
            f"`pyro-vae estimators` lists each estimator's options"
        )


def check_estimators_run(
    vae: PyroModel,
    x: torch.Tensor,
    estimators: Sequence[Any],
    particles: int,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Run each estimator once on a small batch: a clear error now, not mid-comparison."""
    for estimator in estimators:
        spec = estimator_spec(estimator)
        model = copy.deepcopy(vae)
        try:
            with private_param_store():
                _run_once(spec, model, x, particles, options or {})
        except UserInputError as error:
            raise UserInputError(
                f"estimator {spec.key} cannot run with this model: {error}"
            ) from None
        except (ValueError, NotImplementedError, RuntimeError, AttributeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            raise UserInputError(
                f"estimator {spec.key} cannot run with this model: {reason}"
            ) from None


def _run_once(
    spec: Any, model: PyroModel, x: torch.Tensor, particles: int, options: Mapping[str, Any]
) -> None:
    check_estimator_fits(spec, model)
    elbo = spec.build(particles, options=estimator_options_for(spec.key, options))
    elbo.differentiable_loss(model.model, model.guide, x).backward()


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
    _check_budget(budget, budget_seconds)
    baseline = _baseline_key(baseline, estimators)
    pool = _checked_pool(config, estimators, estimator_options, snr_outer, executor, ais_steps)
    _check_options(config, repeats, eval_samples, grad_draws, snr_particles, bound_particles)
    executor = _serial_unless(executor)
    # the SNR and bound studies run in this process whatever the executor: a GPU must be here
    check_device(config.train.device)
    data, test_images = _test_images(config, eval_points)
    _check_model(config, data, test_images, estimators, pool)
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
    runs, runs_wall_seconds = train_runs(executor, specs, labels, log, eval_samples)
    if log is not None:
        for line in unspent_time(runs, shared):
            log(f"warning: {line}")
    trained = first_repeat_models(runs, config, data.data_shape)  # on config.train.device
    grad_images = test_images[: min(grad_batch, len(test_images))]
    snr = snr_section(
        trained, estimators, grad_images, snr_particles, snr_outer, grad_draws, config, log, pool
    )
    bound_images = test_images[:bound_points]
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


def _checked_pool(
    config: Any,
    estimators: Sequence[str],
    estimator_options: Mapping[str, Any] | None,
    snr_outer: Sequence[int],
    executor: Any,
    ais_steps: int | None,
) -> dict[str, Any]:
    """The options of the estimators compared (``estimator_options`` over the config's),
    each used by one of them; the executor reaches them; M and the AIS steps in range."""
    if not snr_outer or min(snr_outer) < 1:
        raise UserInputError(f"every M in snr_outer must be >= 1, got {list(snr_outer)}")
    pool = {**config.train.estimator_options, **(estimator_options or {})}
    _check_options_used(estimators, pool)
    check_executor_reaches(estimators, executor)
    if ais_steps is not None and ais_steps < 1:
        raise UserInputError(f"--ais-steps must be >= 1, got {ais_steps}")
    return pool


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


def _check_budget(budget: str, budget_seconds: float | None) -> None:
    if budget not in BUDGETS:
        raise UserInputError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if budget == "seconds":
        if budget_seconds is None or not isinstance(budget_seconds, (int, float)):
            raise UserInputError("budget 'seconds' needs budget_seconds, the seconds per run")
        if not (math.isfinite(budget_seconds) and budget_seconds > 0):
            raise UserInputError(f"budget_seconds must be > 0, got {budget_seconds}")
    elif budget_seconds is not None:
        raise UserInputError(
            f"budget_seconds applies to the budget 'seconds', not {budget!r}: leave it out"
        )


def _baseline_key(baseline: Any, estimators: Sequence[str]) -> str:
    """The key of the baseline estimator (the first compared when ``None``), which
    must be one of those compared."""
    if baseline is None:
        return estimators[0]
    key = estimator_spec(baseline).key
    if key not in estimators:
        raise UserInputError(
            f"the baseline estimator {key} is not among those compared ({', '.join(estimators)})"
        )
    return key


def _serial_unless(executor: Any) -> Any:
    """``executor``, or the serial one (in this process) when none is given."""
    if executor is not None:
        return executor
    from pyro_vae.app.executors import SerialExecutor

    return SerialExecutor()


def _compile_evaluation(config: RunConfig) -> bool | None:
    """Whether evaluation runs through captured graphs (``None``: decided by the work)."""
    return None if config.train.compile == "auto" else bool(config.train.compile)


def _check_options(
    config: RunConfig,
    repeats: int,
    eval_samples: int,
    grad_draws: int,
    snr_particles: Sequence[int],
    bound_particles: Sequence[int],
) -> None:
    if repeats < 1:
        raise UserInputError(f"--repeats must be >= 1, got {repeats}")
    if config.train.seed + repeats - 1 > 2**32 - 1:
        raise UserInputError(
            f"seeds {config.train.seed} to {config.train.seed + repeats - 1} (one per repeat) "
            f"must each be at most 4294967295: lower --seed"
        )
    if eval_samples < 1:
        raise UserInputError(f"--eval-samples must be >= 1, got {eval_samples}")
    if grad_draws < 2:
        raise UserInputError(f"--grad-draws must be >= 2 (a variance needs two), got {grad_draws}")
    if min(snr_particles) < 1 or min(bound_particles) < 1:
        raise UserInputError("every K in --snr-particles and --bound-particles must be >= 1")


def _test_images(config: RunConfig, eval_points: int | None) -> tuple[Any, torch.Tensor]:
    """The data set (split with the first repeat's seed) and its evaluated test images."""
    from pyro_vae.data import load_data

    data = load_data(
        config.data.dataset,
        config.data.data_dir,
        config.data.binarize,
        config.data.validation_size,
        seed=config.train.seed,
        limit=config.data.limit,
    )
    test_images = data.evaluation_images("test")
    if eval_points is not None:
        test_images = test_images[:eval_points]
    return data, test_images


def _check_model(
    config: RunConfig,
    data: Any,
    test_images: torch.Tensor,
    estimators: Sequence[str],
    options: Mapping[str, Any] | None = None,
) -> None:
    """The model takes the data and every estimator runs on it: before any training."""
    from pyro_vae.models.build import build_vae
    from pyro_vae.models.protocol import check_data

    torch.manual_seed(config.train.seed)
    probe: Any = build_vae(config.model, data.data_shape)
    check_data(probe, test_images, "the test set")
    train = config.train
    check_estimators_run(
        probe,
        test_images[:8],
        estimators,
        train.particles,
        train.estimator_options if options is None else options,
    )
