"""The runs of a comparison: one plain-data spec per (repeat, estimator), each trained
from its seed's shared initial parameters into its own run folder by
:func:`train_compare_run` (evaluated and measured there, in whatever process the
executor chose); then the SNR and bound studies on the first repeat's models.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pyro_vae.analysis.comparison import (
    bounds_versus_particles,
    outer_option,
    own_objective_and_gradients,
    samples_budget_steps,
    samples_per_step,
)
from pyro_vae.analysis.gradients import snr_versus_outer, snr_versus_particles
from pyro_vae.app.compare_report import run_line
from pyro_vae.app.training_run import DataCache, train_in_folder
from pyro_vae.objectives.registry import (
    estimator_spec,
    instance_options,
)

if TYPE_CHECKING:
    from pyro_vae.config import RunConfig


def estimator_options_for(key: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``options`` that estimator ``key`` has (a comparison's options apply
    to each estimator that takes them), with an ELBO object's own settings."""
    spec = estimator_spec(key)
    names = {o.name for o in spec.options}
    return {**instance_options(spec), **{k: v for k, v in options.items() if k in names}}


def budget_of(
    config: RunConfig,
    estimators: Sequence[str],
    budget: str,
    seconds: float | None,
    num_train: int,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the estimators share, and what each one gets: the reference of ``epochs``
    epochs of K samples per data point and step, and per estimator its samples per step
    and (under the samples budget) its epochs and step cap."""
    train = config.train
    steps_per_epoch = math.ceil(num_train / train.batch_size)
    steps = train.epochs * steps_per_epoch
    each = {}
    for name in estimators:
        samples = samples_per_step(
            estimator_spec(name),
            train.particles,
            estimator_options_for(name, train.estimator_options if options is None else options),
        )
        epochs, cap = train.epochs, None
        if budget == "samples":
            epochs, cap = samples_budget_steps(steps, train.particles, samples, steps_per_epoch)
        each[name] = {"samples_per_step": samples, "epochs": epochs, "max_steps": cap}
    return {
        "kind": budget,
        "epochs": train.epochs,
        "steps_per_epoch": steps_per_epoch,
        "steps": steps,
        "particles": train.particles,
        "samples_per_point": train.epochs * train.particles,
        "seconds": seconds,
        "estimators": each,
    }


def unspent_time(runs: Sequence[dict[str, Any]], budget: dict[str, Any]) -> list[str]:
    """Under the seconds budget, the runs that ended at their epochs with time left."""
    if budget["kind"] != "seconds":
        return []
    return [
        f"{run['estimator']} (seed {run['seed']}) trained all {run['epochs']} epochs in "
        f"{sum(e['seconds'] for e in run['history']):.1f} s, short of the "
        f"{budget['seconds']:g}-second budget: raise epochs (the cap) for an equal-time run"
        for run in runs
        if run.get("stopped_by") == "epochs"
    ]


def folder_name(key: str) -> str:
    """An estimator's key as part of a folder's name (an import path's ``:`` and any
    character a file system may refuse become ``_``)."""
    return re.sub(r"[^\w.-]", "_", key)


def initial_parameters(
    config: RunConfig, data_shape: Sequence[int], seed: int
) -> dict[str, torch.Tensor]:
    """The model's parameters as built from ``seed``: one build per seed, a copy for each
    estimator, so that all start alike whatever the factory does with random numbers."""
    from pyro_vae.models.build import build_vae
    from pyro_vae.models.protocol import forked_rng

    with forked_rng():
        torch.manual_seed(seed)
        vae = build_vae(config.model, data_shape)
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def run_specs(
    config: RunConfig,
    estimators: Sequence[str],
    runs_dir: Path,
    repeats: int,
    measurements: dict[str, Any],
    progress: bool,
    data_shape: Sequence[int] = (),
    budget: dict[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """One :func:`train_compare_run` spec per (repeat, estimator), and its label; under
    a samples or seconds ``budget`` (:func:`budget_of`) each run's epochs and cap."""
    train = config.train
    specs, labels = [], []
    for repeat in range(repeats):
        seed = train.seed + repeat
        initial = initial_parameters(config, data_shape, seed)
        for name in estimators:
            options_of = estimator_options_for(
                name, train.estimator_options if options is None else options
            )
            limits: dict[str, Any] = {}
            mine = budget["estimators"][name] if budget else {}
            if budget and budget["kind"] == "samples":
                limits = {"epochs": mine["epochs"], "max_steps": mine["max_steps"]}
            elif budget and budget["kind"] == "seconds":
                limits = {"max_seconds": float(budget["seconds"])}
            run_config = dataclasses.replace(
                config,
                train=dataclasses.replace(
                    train, estimator=name, estimator_options=options_of, seed=seed, **limits
                ),
            )
            specs.append(
                {
                    "config": run_config.to_dict(),
                    "data_seed": train.seed,
                    "repeat": repeat,
                    "run_dir": str(runs_dir / f"{folder_name(name)}-seed{seed}"),
                    "initial_state": initial,
                    **measurements,
                    "keep_parameters": repeat == 0,
                    "progress": progress,
                    "samples_per_step": mine.get("samples_per_step", train.particles),
                }
            )
            labels.append(f"{name}, repeat {repeat + 1}/{repeats} (K={train.particles})")
    return specs, labels


def train_runs(
    executor: Any,
    specs: list[dict[str, Any]],
    labels: list[str],
    log: Callable[[str], None] | None,
    eval_samples: int,
    cache: DataCache | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Every spec trained by ``executor``, each from a fresh folder; with the wall time.
    Each finished run is logged as one line. ``cache``: the comparison's data sets (the
    runs in this process read each once)."""
    for spec in specs:  # an earlier comparison's run of the same name: this one starts afresh
        if Path(spec["run_dir"]).is_dir():
            shutil.rmtree(spec["run_dir"])
    if log is not None:
        log(f"training {len(specs)} runs ({executor.name}) ...")
    started = time.perf_counter()
    train = functools.partial(train_compare_run, cache=cache or DataCache())
    runs = executor.map(train, specs, log=log, labels=labels)
    wall_seconds = time.perf_counter() - started
    if log is not None:
        for run in runs:
            log(run_line(run, eval_samples))
    return runs, wall_seconds


def first_repeat_models(
    runs: list[dict[str, Any]], config: RunConfig, data_shape: Sequence[int]
) -> dict[str, Any]:
    """The first repeat's trained models by estimator, rebuilt from the parameters that
    their runs returned (which leave the run records here)."""
    from pyro_vae.models.build import build_vae

    trained: dict[str, Any] = {}
    for run in runs:
        parameters = run.pop("parameters", None)
        if parameters is not None:
            vae = build_vae(config.model, data_shape)
            vae.load_state_dict(parameters)
            trained[run["estimator"]] = vae.to(config.train.device)
    return trained


#: the estimators whose SNR against K (and M) a comparison measures, where compared
#: (with any that has an outer-sample option); iwae and dreg where none of them is
SNR_STUDIED = ("iwae", "dreg", "miwae", "ciwae", "piwae")


def snr_estimators(estimators: Sequence[str]) -> list[str]:
    """The compared estimators of the SNR study (:data:`SNR_STUDIED`, or with an
    outer-sample option), else iwae and dreg."""
    studied = [
        name
        for name in estimators
        if estimator_spec(name).name in SNR_STUDIED or outer_option(estimator_spec(name))
    ]
    return studied or ["iwae", "dreg"]


def snr_section(
    trained: dict[str, Any],
    estimators: Sequence[str],
    grad_images: torch.Tensor,
    snr_particles: Sequence[int],
    snr_outer: Sequence[int],
    grad_draws: int,
    config: RunConfig,
    log: Callable[[str], None] | None,
    pool: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """SNR against K (and M, for an estimator with an outer-sample option) at the
    parameters of one first-repeat model (IWAE's if trained)."""
    reference_name = next((n for n in ("iwae", "dreg", "mc") if n in trained), estimators[0])
    names = snr_estimators(estimators)
    pool = config.train.estimator_options if pool is None else pool
    options = {n: estimator_options_for(n, pool) for n in names}
    if log is not None:
        log(f"SNR against K at the {reference_name}-trained parameters ...")
    vae = trained[reference_name]
    seed = config.train.seed
    rows = snr_versus_particles(
        vae, grad_images, names, snr_particles, grad_draws, seed=seed, options=options
    )
    for row in rows:
        row["varied"] = "K"
        outer = outer_option(estimator_spec(row["estimator"]))
        if outer is not None:
            row["outer"] = estimator_spec(row["estimator"]).resolve_options(
                options[row["estimator"]]
            )[outer.name]
    for name in names:
        outer = outer_option(estimator_spec(name))
        if outer is None:
            continue
        if log is not None:
            log(f"SNR of {name} against M ({outer.name}) at K={config.train.particles} ...")
        rows += snr_versus_outer(
            vae,
            grad_images,
            name,
            outer.name,
            snr_outer,
            config.train.particles,
            grad_draws,
            seed=seed,
            options=options[name],
        )
    return {"parameters_of": reference_name, "rows": rows}


def bounds_section(
    trained: dict[str, Any],
    bound_images: torch.Tensor,
    bound_particles: Sequence[int],
    eval_samples: int,
    config: RunConfig,
    log: Callable[[str], None] | None,
) -> Any:
    """The bounds against K of the first repeat's models."""
    if log is not None:
        log("bounds against K ...")
    return bounds_versus_particles(
        trained, bound_images, bound_particles, eval_samples, config.train.seed
    )


def train_compare_run(spec: dict[str, Any], cache: DataCache | None = None) -> dict[str, Any]:
    """Train one estimator from its seed's initial parameters, evaluate and measure it.

    ``spec`` is plain data (so the call can run in another process): ``config`` (a
    :class:`~pyro_vae.config.RunConfig` as a dict, with this run's estimator and seed),
    ``data_seed``, ``repeat``, ``run_dir``, ``eval_samples``, ``eval_points``,
    ``grad_draws``, ``grad_batch``, ``compile_evaluation``, ``keep_parameters`` and
    ``progress``. Training checkpoints into ``run_dir`` after every epoch and, if a
    checkpoint of the same config is there already (a retried call whose process
    died), resumes from it: the result is the same either way. Returns the run's
    record, plain numbers and lists, with ``parameters`` (the trained state dict) when
    ``keep_parameters``.
    """
    from pyro_vae.analysis.evaluation import evaluate
    from pyro_vae.config import RunConfig

    config = RunConfig.from_dict(spec["config"])
    train = config.train
    data, test_images = spec_data(config, spec, cache or DataCache())
    vae, history, timing = train_in_folder(
        config,
        data,
        Path(spec["run_dir"]),
        spec["progress"],
        initial_state=spec.get("initial_state"),
    )
    evaluation = evaluate(
        vae,
        test_images,
        spec["eval_samples"],
        progress=spec["progress"],
        compile=spec["compile_evaluation"],
    ).to_dict()
    if spec.get("ais_steps"):
        from pyro_vae.app.ais_report import measure_ais

        evaluation.update(
            measure_ais(vae, test_images, spec["ais_steps"], 16, 5, False, spec["progress"])
        )
    grad_images = test_images[: min(spec["grad_batch"], len(test_images))]
    objective, gradients = own_objective_and_gradients(
        vae,
        test_images,
        grad_images,
        train.estimator,
        train.particles,
        spec["grad_draws"],
        train.estimator_options,
        train.seed,
    )
    steps_per_epoch = math.ceil(len(data.train) / train.batch_size)
    samples = spec.get("samples_per_step", train.particles)
    run = {
        "estimator": train.estimator,
        "repeat": spec["repeat"],
        "seed": train.seed,
        "particles": train.particles,
        "epochs": len(history),
        "steps": history.last["step"],
        "epochs_trained": history.last["step"] / steps_per_epoch,
        "samples_per_step": samples,
        "samples_per_point": history.last["step"] / steps_per_epoch * samples,
        "stopped_by": stopped_by(train, history),
        # (a run cut inside an epoch: its training time over the epochs it trained)
        "seconds_per_epoch": float(np.median(history["seconds"]))
        if history.last["step"] % steps_per_epoch == 0
        else sum(history["seconds"]) / (history.last["step"] / steps_per_epoch),
        **timing,
        "run_dir": spec["run_dir"],
        "history": history.epochs,
        "test_objective": objective,
        "objective_minus_log_likelihood": objective - evaluation["test_log_likelihood"],
        "evaluation": evaluation,
        "gradients": gradients,
    }
    if spec["keep_parameters"]:
        run["parameters"] = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    return run


def stopped_by(train: Any, history: Any) -> str:
    """What ended a run: ``"seconds"`` (its time budget), ``"max_steps"`` (its step
    cap), else ``"epochs"``."""
    if train.max_seconds is not None and sum(history["seconds"]) >= train.max_seconds:
        return "seconds"
    if train.max_steps is not None and history.last["step"] >= train.max_steps:
        return "max_steps"
    return "epochs"


def spec_data(
    config: RunConfig, spec: dict[str, Any], cache: DataCache
) -> tuple[Any, torch.Tensor]:
    """The data set of a run spec (from the comparison's ``cache``) and its evaluated
    test images."""
    data = cache.get(config.data, spec["data_seed"])
    test_images = data.evaluation_images("test")
    if spec["eval_points"] is not None:
        test_images = test_images[: spec["eval_points"]]
    return data, test_images
