"""One run trained into its folder: the checks before a run, written once, and the
training of a run into its folder (resumed from the checkpoint there if one of the same
config exists) that ``train``, ``compare`` and ``sweep`` share.

:func:`checked_model` is what every command checks before anything is written: the data
fits the model and memory, the estimator fits the model and can be built.
:func:`train_in_folder` trains (or resumes) one run in a folder and times it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pyro_vae.config import DataConfig, RunConfig
from pyro_vae.errors import UserInputError

__all__ = ["checked_model", "checkpoint_epoch", "load_data_once", "train_in_folder"]


def checked_model(config: RunConfig, data: Any, *, on_device: bool = True) -> torch.nn.Module:
    """The run's model, built from its seed, after every check a run makes before it
    writes: the step fits in memory, the data fits the model, the estimator fits the
    model and is built once (a bad combination fails now, not after any file is written).
    ``on_device``: the model is moved to the run's device before the checks (the checks
    run where it trains); a device this machine lacks is refused by
    :func:`~pyro_vae.resources.check_device`, called before the data is read."""
    from pyro_vae.models.build import build_vae
    from pyro_vae.objectives.registry import check_estimator_fits, make_elbo
    from pyro_vae.resources import check_training_fits
    from pyro_vae.training.fit import check_data_once

    check_training_fits(config, data.data_shape, len(data.train))
    torch.manual_seed(config.train.seed)
    vae = build_vae(config.model, data.data_shape)
    if on_device:
        vae = vae.to(config.train.device)
    check_data_once(vae, data)
    check_estimator_fits(config.train.estimator, vae)
    make_elbo(
        config.train.estimator, config.train.particles, options=config.train.estimator_options
    )
    return vae


@functools.lru_cache(maxsize=2)
def _cached_data(
    dataset: str,
    data_dir: Any,
    binarize: str,
    validation_size: int,
    seed: int,
    limit: int | None,
) -> Any:
    """Runs in one process (serial, or a reused Ray worker) read the data once."""
    from pyro_vae.data import load_data

    return load_data(dataset, data_dir, binarize, validation_size, seed=seed, limit=limit)


def load_data_once(data_config: DataConfig, seed: int) -> Any:
    """The data set of ``data_config`` split with ``seed``, read once per process (the
    runs of a comparison or a sweep share it; none of them changes it)."""
    return _cached_data(
        data_config.dataset,
        data_config.data_dir,
        data_config.binarize,
        data_config.validation_size,
        seed,
        data_config.limit,
    )


def train_in_folder(
    config: RunConfig,
    data: Any,
    run_dir: Path,
    progress: bool,
    callbacks: Sequence[Callable[..., Any]] = (),
    initial_state: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Train (or resume) one run in ``run_dir``, from the run's seed: the model, its
    history, and the timing fields of its record (wall and CPU time; CPU time beside wall
    time, since wall time swings with the load of other processes). ``compare`` and
    ``sweep`` train each of their runs through this. ``initial_state``: the parameters
    to start from (a comparison's, shared by its estimators) instead of the fresh
    model's."""
    from pyro_vae.models.build import build_vae
    from pyro_vae.training.fit import fit
    from pyro_vae.training.trainer import CHECKPOINT

    resumed_at = checkpoint_epoch(run_dir / CHECKPOINT, config)
    # a run folder like any other: evaluate, sample and diagnose read its config.json
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    torch.manual_seed(config.train.seed)
    vae = build_vae(config.model, data.data_shape)
    if initial_state is not None:
        vae.load_state_dict(initial_state)
    started, cpu_started = time.perf_counter(), time.process_time()
    history = fit(
        vae,
        data,
        config.train,
        run_dir=run_dir,
        resume=resumed_at is not None,
        saved_config=config.to_dict(),
        callbacks=callbacks,
        progress=progress,
        log=None,
    )
    train_seconds = time.perf_counter() - started
    train_cpu_seconds = time.process_time() - cpu_started
    trained_epochs = max(1, len(history) - (resumed_at or 0))
    timing = {
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "cpu_seconds_per_epoch": train_cpu_seconds / trained_epochs,
        "resumed_at_epoch": resumed_at,
    }
    return vae, history, timing


def checkpoint_epoch(path: Path, config: RunConfig) -> int | None:
    """The epoch of the checkpoint at ``path`` if there is one to resume, else ``None``.

    A checkpoint trained with another config is an error, not something to continue.
    """
    from pyro_vae.app.runs import config_differences
    from pyro_vae.training.checkpoint import load_checkpoint

    if not path.exists():
        return None
    checkpoint = load_checkpoint(path)
    changed = config_differences(checkpoint["config"], config.to_dict())
    if changed:
        raise UserInputError(
            f"{path} was trained with another config ({'; '.join(changed[:3])}): remove its "
            f"folder or choose another output folder"
        )
    return int(checkpoint["epoch"])
