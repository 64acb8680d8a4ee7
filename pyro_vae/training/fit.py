"""``fit``: train a model on a data set, checked once, resumable from its run folder."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae import distributed
from pyro_vae.compat import tensor_version
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import VAEData
from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import ModelError, check_data, check_protocol
from pyro_vae.objectives.registry import estimator_spec
from pyro_vae.resources import check_device
from pyro_vae.training.callbacks import Callback
from pyro_vae.training.checkpoint import CHECKPOINT, load_checkpoint
from pyro_vae.training.history import History
from pyro_vae.training.optimization import optimization
from pyro_vae.training.trainer import Trainer, rank_seed


def check_data_once(vae: torch.nn.Module, data: VAEData) -> None:
    """Check every split of ``data`` against the model (its shape, finite values inside
    the likelihood's support), once per data set and kind of model.

    The check reads every value (70,000 MNIST images: a sizeable share of a short
    ``fit`` call), so it is remembered in ``data``: a later call with the same model
    kind on the same, unchanged tensors skips it. Replacing a split's tensor or changing
    it in place (its version counter moves) makes the next call check again.
    """
    likelihood = getattr(vae, "likelihood", None)
    kind = (
        type(vae),
        getattr(vae, "data_shape", None),
        type(likelihood),
        getattr(likelihood, "support", None),
    )
    for split in ("train", "test", "validation"):
        images = getattr(data, split).images
        if not images.shape[0]:
            continue
        version = tensor_version(images)
        seen = data.checked.get((split, kind))
        if version is not None and seen is not None and seen[0]() is images and seen[1] == version:
            continue
        check_data(vae, images, what=f"the {split} set of {data.name}")
        data.checked[(split, kind)] = (weakref.ref(images), version)


def described_run(vae: torch.nn.Module, data: VAEData, config: TrainConfig) -> RunConfig | None:
    """The run's whole config, where the model and data say how to rebuild them."""
    model_config = getattr(vae, "config", None)
    if not isinstance(model_config, ModelConfig) or data.source is None:
        return None
    if data.seed != config.seed:  # the data would not reload the same (held-out split)
        return None
    spec = estimator_spec(config.estimator)
    if spec.instance is not None and spec.path is None:  # (no import path rebuilds it)
        return None
    return RunConfig(model=model_config, data=DataConfig(**data.source), train=config)


def fit(
    vae: torch.nn.Module,
    data: VAEData,
    config: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    saved_config: dict[str, Any] | None = None,
    callbacks: Iterable[Callback | Callable[[dict[str, Any]], None]] = (),
    progress: bool = True,
    log: Callable[[str], Any] | None = print,
) -> History:
    """Train ``vae`` on ``data`` by SVI with the estimator of ``config``; return the history.

    Per epoch it records ``train_elbo`` (the training estimator's own bound, unannealed:
    the ELBO for ``mc``/``analytic``, L_K for ``iwae``), ``test_elbo`` with its terms
    ``test_expected_log_likelihood`` and ``test_kl`` (closed-form KL where exact),
    ``validation_*`` when there is a validation set, ``seconds``, ``lr`` and
    ``kl_factor``; all in nats per data point. With ``run_dir`` it writes an atomic
    checkpoint and ``metrics.jsonl`` after every epoch; ``resume=True`` continues from
    the checkpoint there, reproducing the uninterrupted run exactly on CPU.

    ``callbacks``: :class:`~pyro_vae.training.callbacks.Callback` objects, whose hooks
    run around the loop after the trainer's own, or plain functions, called with each
    epoch's metrics dict.

    Under ``torchrun`` (every process calls ``fit`` alike, after
    :func:`pyro_vae.distributed.init_from_environment`) the processes train one model
    data-parallel: ``config.batch_size`` is the global batch, shared out over them;
    gradients are averaged before each step; evaluations are sharded; the first process
    alone writes the run folder, and the checkpoint holds every process's RNG state.

    A run folder written here is the command line's format: where the model was built
    by :func:`~pyro_vae.models.build.build_vae` and the data loaded by
    :func:`~pyro_vae.data.load_data` with the run's seed, ``config.json`` records all
    three configs (absolute paths), and ``pyro-vae evaluate``/``sample``/``diagnose`` read
    the folder from any directory. A model of your own class has no such config: its
    folder holds the checkpoint and metrics, for ``model.load_state_dict``.
    """
    check_device(config.device)
    check_protocol(vae)
    if not isinstance(vae, torch.nn.Module):
        raise ModelError(
            f"fit trains a torch.nn.Module (its state_dict is what a checkpoint holds); "
            f"{type(vae).__name__} is not one: make the object holding model and guide a Module"
        )
    if len(data.train) == 0:
        raise UserInputError("the training set is empty: pass data with at least one point")
    check_data_once(vae, data)
    if run_dir is not None:
        if not isinstance(run_dir, (str, os.PathLike)):
            raise UserInputError(f"run_dir must be a folder's path, got {type(run_dir).__name__}")
        if Path(run_dir).exists() and not Path(run_dir).is_dir():
            raise UserInputError(f"run_dir {run_dir} is a file: pass a folder for the run")
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if saved_config is None and not resume:
            described = described_run(vae, data, config)
            if described is not None:
                if distributed.is_main():
                    described.save(Path(run_dir) / "config.json")
                saved_config = described.to_dict()
    if not resume:
        pyro.set_rng_seed(config.seed)
        if distributed.rank() > 0:  # each process its own noise (the first: the seed's)
            pyro.set_rng_seed(rank_seed(config.seed, distributed.rank(), 0) % 2**32)
    trainer = Trainer(vae, data, config, run_dir, saved_config, optimization=optimization(config))
    if resume:
        if run_dir is None:
            raise UserInputError("resume needs the run folder that holds the checkpoint")
        trainer.load_state_dict(load_checkpoint(Path(run_dir) / CHECKPOINT))
        if config.epochs > trainer.epoch and not trainer.history.stopped_early:
            trainer.finished = False  # asked for more epochs than the run had
    return trainer.run(callbacks=callbacks, progress=progress, log=log)
