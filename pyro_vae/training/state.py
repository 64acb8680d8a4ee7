"""A trainer's state as a checkpoint holds it, and the trainer restored from one.

The state: model and guide parameters, optimizer, every RNG state (each process's under
``torchrun``), epoch, step, the config, the history, early stopping's best epoch and
counts, whether the run finished, its mid-epoch position (a preempted run), the data's
digests and the step path the run started on. A resumed run reproduces the
uninterrupted one bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from pyro_vae import distributed
from pyro_vae.config import TrainConfig
from pyro_vae.errors import CheckpointError
from pyro_vae.training.batches import rank_seed
from pyro_vae.training.callbacks import EarlyStopping
from pyro_vae.training.checkpoint import check_data_digest, rng_state, set_rng_state
from pyro_vae.training.compilation import StepPath
from pyro_vae.training.history import History


class Checkpointed(Protocol):
    """What a checkpoint holds of a trainer, and sets on resuming
    (:class:`pyro_vae.training.trainer.Trainer` is one)."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data_generator: torch.Generator
    config: TrainConfig
    saved_config: dict[str, Any]
    run_dir: Path | None
    epoch: int
    step: int
    steps_per_epoch: int
    history: History
    early_stopping: EarlyStopping
    finished: bool
    position: dict[str, Any] | None
    data_digest: dict[str, str]
    path: StepPath
    rank: int
    world: int


def trainer_state(trainer: Checkpointed) -> dict[str, Any]:
    """What a checkpoint of ``trainer`` holds (every process takes part under torchrun:
    the RNG states are gathered)."""
    compiled = trainer.path.recorded
    return {
        "model": trainer.module.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "rng": rng_state(trainer.data_generator),
        "epoch": trainer.epoch,
        "step": trainer.step,
        "config": trainer.saved_config,
        "history": trainer.history.epochs,
        "best_epoch": trainer.history.best_epoch,
        "stopped_early": trainer.history.stopped_early,
        "best_elbo": trainer.early_stopping.best_elbo,
        "epochs_since_best": trainer.early_stopping.epochs_since_best,
        "finished": trainer.finished,
        "position": trainer.position,
        "data_digest": trainer.data_digest,
        **({"compiled": list(compiled)} if compiled is not None else {}),
        # every process's RNGs (the data order is shared; the noise is each rank's)
        **(
            {"rng_ranks": distributed.gather_objects(rng_state(trainer.data_generator))}
            if trainer.world > 1
            else {}
        ),
    }


def restore_trainer(trainer: Checkpointed, state: dict[str, Any]) -> None:
    """Put ``trainer`` in the checkpointed ``state``: one line for a checkpoint of
    another model or version, or of other data."""
    try:
        trainer.module.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == trainer.world:
            set_rng_state(ranks[trainer.rank], trainer.data_generator)
        else:
            set_rng_state(state["rng"], trainer.data_generator)
            if trainer.rank > 0:  # resumed with more processes than saved: fresh noise
                torch.manual_seed(rank_seed(trainer.config.seed, trainer.rank, int(state["step"])))
        trainer.epoch, trainer.step = int(state["epoch"]), int(state["step"])
        trainer.history = History(
            list(state["history"]), bool(state["stopped_early"]), state["best_epoch"]
        )
        trainer.early_stopping.best_elbo = float(state["best_elbo"])
        trainer.early_stopping.epochs_since_best = int(state["epochs_since_best"])
        trainer.finished = bool(state["finished"])
        trainer.position = checked_position(state.get("position"), trainer.steps_per_epoch)
        compiled = state.get("compiled")
        trainer.path.recorded = (bool(compiled[0]), int(compiled[1])) if compiled else None
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"the checkpoint does not fit this model or version ({str(error).splitlines()[0]}):"
            f" resume with the run's own config.json, or start over (`overwrite`)"
        ) from None
    check_data_digest(state.get("data_digest"), trainer.data_digest, "resume")


def checked_position(position: Any, steps_per_epoch: int) -> dict[str, Any] | None:
    """A checkpoint's mid-epoch position, checked (``None``: at an epoch's end)."""
    if position is None:
        return None
    if not isinstance(position, dict):
        raise TypeError("its mid-epoch position is not a dictionary")
    steps, count = position.get("steps"), position.get("count")
    if not (isinstance(steps, int) and isinstance(count, int) and 0 < steps < steps_per_epoch):
        raise ValueError(
            f"its mid-epoch position ({steps!r} steps) is not inside an epoch of "
            f"{steps_per_epoch} steps"
        )
    if not isinstance(position.get("total"), float) or not torch.is_tensor(
        position.get("epoch_rng")
    ):
        raise TypeError("its mid-epoch position lacks the epoch's sums or data order")
    return {**position, "seconds": float(position.get("seconds", 0.0))}
