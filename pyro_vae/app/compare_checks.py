"""What a comparison checks before it trains: the estimators named (built-in, import
path or ``Estimator``), the options each takes, the budget, the baseline, the settings,
the data and model with every estimator, the executor's reach. Each check raises
:class:`~pyro_vae.errors.UserInputError` naming the problem and the fix; nothing is
written before all have passed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pyro_vae.analysis.comparison import BUDGETS
from pyro_vae.app.compare_runs import estimator_options_for
from pyro_vae.app.training_run import DataCache
from pyro_vae.errors import UserInputError
from pyro_vae.imports import is_import_path
from pyro_vae.models.protocol import private_param_store
from pyro_vae.objectives.registry import (
    BUILT_IN,
    ESTIMATORS,
    check_estimator_fits,
    estimator_spec,
)
from pyro_vae.resources import check_device

if TYPE_CHECKING:
    from pyro_vae.config import RunConfig
    from pyro_vae.models.protocol import PyroModel

__all__ = [
    "baseline_key",
    "check_budget",
    "check_estimators_run",
    "check_executor_reaches",
    "check_options",
    "checked_data",
    "checked_pool",
    "parse_estimators",
]


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


def checked_pool(
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


def check_budget(budget: str, budget_seconds: float | None) -> None:
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


def baseline_key(baseline: Any, estimators: Sequence[str]) -> str:
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


def check_options(
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


def checked_data(
    config: RunConfig,
    eval_points: int | None,
    cache: DataCache,
    estimators: Sequence[str],
    options: Mapping[str, Any],
) -> tuple[Any, torch.Tensor]:
    """The data set and its evaluated test images, once the device is here and the model
    takes the data with every estimator (before any training)."""
    # the SNR and bound studies run in this process whatever the executor: a GPU must be here
    check_device(config.train.device)
    data, test_images = _test_images(config, eval_points, cache)
    _check_model(config, data, test_images, estimators, options)
    return data, test_images


def _test_images(
    config: RunConfig, eval_points: int | None, cache: DataCache
) -> tuple[Any, torch.Tensor]:
    """The data set (split with the first repeat's seed) and its evaluated test images."""
    data = cache.get(config.data, config.train.seed)
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
