"""The :class:`Trainer`: one run's loop of stochastic variational inference, its state
and its checkpoints, which survive crashes and preemption.

The trainer steps (:class:`~pyro_vae.training.step.Step`: loss and gradients, averaged
under ``torchrun``, checked finite before the optimizer steps) over each epoch's
batches, then makes the epoch's record and hands it to its callbacks
(:mod:`~pyro_vae.training.callbacks`: evaluation, early stopping, ``metrics.jsonl``,
the checkpoint, the console line, and the caller's). What it is handed: the optimizer
and schedule (:mod:`~pyro_vae.training.optimization`); what it asks: the step path
(:class:`~pyro_vae.training.compilation.StepPath`: the loss and gradients come from a
graph captured from the estimator's ELBO and checked against it, about 1 ms less per
step, measured, when the run is long enough to repay the capture, else from the ELBO
itself: ``compile=False``, short runs, KL warm-up, free bits). The networks train in
the modes the caller left them in; every evaluation switches them to eval mode and
back. Since the param store is not used (the optimizer is a ``torch.optim`` one over
the VAE's parameters), the model and guide skip ``pyro.module`` while training (see
:func:`pyro_vae.models.vae.param_store_registration`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae import distributed
from pyro_vae.config import TrainConfig
from pyro_vae.data import VAEData
from pyro_vae.errors import Preempted
from pyro_vae.models.protocol import ModelError, PyroModel, private_param_store
from pyro_vae.models.vae import param_store_registration
from pyro_vae.objectives.capture import CompiledLoss
from pyro_vae.training import preemption
from pyro_vae.training.batches import epoch_batches, rank_seed
from pyro_vae.training.callbacks import (
    Callback,
    Checkpointing,
    EarlyStopping,
    EpochLog,
    Evaluation,
    MetricsFile,
    as_callback,
)
from pyro_vae.training.checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT,
    METRICS,
    check_data_digest,
    save_checkpoint,
)
from pyro_vae.training.epoch import EpochRecord
from pyro_vae.training.history import Budget, History, format_epoch
from pyro_vae.training.optimization import GRADIENT_LIMIT, Optimization
from pyro_vae.training.optimization import optimization as optimization_of
from pyro_vae.training.state import restore_trainer, trainer_state
from pyro_vae.training.step import build_step

__all__ = [
    "BEST_CHECKPOINT",
    "CHECKPOINT",
    "GRADIENT_LIMIT",
    "METRICS",
    "TIMED_STEPS",
    "Callback",
    "History",
    "Trainer",
    "check_data_digest",
    "format_epoch",
    "rank_seed",
]

#: under torchrun: steps timed before the collectives' timeout is set from their time
TIMED_STEPS = 5


class Trainer:
    """One training run: its loop, its state (model, optimizer, RNGs, position, history)
    and its checkpoints. ``optimization`` (default: that of ``config``) gives the
    optimizer, the learning-rate schedule and the gradient limit."""

    def __init__(
        self,
        vae: torch.nn.Module,
        data: VAEData,
        config: TrainConfig,
        run_dir: str | Path | None = None,
        saved_config: dict[str, Any] | None = None,
        *,
        optimization: Optimization | None = None,
    ) -> None:
        if not isinstance(vae, PyroModel):
            raise ModelError(f"{type(vae).__name__} has no model and guide to train")
        self.module: torch.nn.Module = vae.to(config.device)
        self.vae: PyroModel = vae
        self.data, self.config = data, config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.saved_config = (
            saved_config if saved_config is not None else {"train": config.to_dict()}
        )
        self.num_data = len(data.train)
        self.steps_per_epoch = math.ceil(self.num_data / config.batch_size)
        self.epoch = 0  # epochs finished
        self.step = 0  # optimizer steps taken
        plan = optimization if optimization is not None else optimization_of(config)
        self.step_fn = step = build_step(vae, self.module, data, config, plan, (self.run_dir, self))
        self.estimator, self.path, self.guard = step.estimator, step.path, step.guard
        self.optimizer, self.parameters = step.optimizer, step.parameters
        self.schedule = plan.schedule
        self.data_generator = torch.Generator().manual_seed(config.seed)
        # under torchrun: this process's rank among world_size, all training one model
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.history = History()
        self.budget = Budget(config.max_steps, config.max_seconds)
        self.evaluation = Evaluation(
            config.seed, config.eval_particles, config.device, config.monitor_images
        )
        self.early_stopping = EarlyStopping(config.early_stopping_patience)
        self.callbacks: list[Callback] = []
        self.finished = False
        #: where a run stopped inside an epoch (a preempted run): steps done in the epoch,
        #: the partial sums of its bound, and the data generator's state before the
        #: epoch's permutation was drawn (the permutation is drawn again from it)
        self.position: dict[str, Any] | None = None
        self.data_digest = data.digests()
        self._epoch_seconds = 0.0

    @property
    def loss(self) -> CompiledLoss:
        """The step's loss and gradients (a captured graph of the ELBO, or the ELBO)."""
        return self.path.loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's contents (:func:`~pyro_vae.training.state.trainer_state`)."""
        return trainer_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint (:func:`~pyro_vae.training.state.restore_trainer`)."""
        restore_trainer(self, state)

    def save(self, path: Path | None = None) -> None:
        """Checkpoint the run: every process takes part (the RNG states are gathered),
        the first writes, and all wait until it has written."""
        if self.run_dir is None:
            return
        state = self.state_dict()
        if distributed.is_main():
            save_checkpoint(path or self.run_dir / CHECKPOINT, **state)
        distributed.barrier()

    # ------------------------------------------------------------------ training
    def kl_factor(self, step: int) -> float:
        """KL factor of step ``step`` (0-based): rises linearly to 1 over the warm-up."""
        warmup_steps = self.config.kl_warmup_epochs * self.steps_per_epoch
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup_steps)

    def train_epoch(self, progress: bool = True) -> float:
        """One pass over the training set; returns the mean training bound per data point."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.epoch)
        # (a run resumed mid-epoch starts where it stopped, from the position it kept)
        position, self.position = self.position, None
        desc = f"epoch {self.epoch + 1}/{config.epochs}"
        bar = (self.steps_per_epoch, desc, progress)
        record = EpochRecord(position, self.data_generator, self.num_data, bar)
        self.guard.mark_epoch_start()  # what a failed epoch goes back to
        self.loss.refresh()  # the networks as they are now (a callback may have changed them)
        batches = epoch_batches(
            self.data,
            config.batch_size,
            self.data_generator,
            record.order,
            record.first,
            config.seed,
            self,
        )
        with (
            pyro.validation_enabled(False),  # the data were checked once, up front
            param_store_registration(self.vae, False),
            private_param_store(),  # a model's pyro.module calls never touch the global store
            record.bar,
            warnings.catch_warnings(),
        ):
            # a NaN is reported by the finite checks, with the epoch and step
            warnings.filterwarnings("ignore", message="Encountered (NaN|[+-]inf)")
            for batch, size in batches:
                batch = batch.to(config.device, non_blocking=True)
                # this process's part of a global batch of `size` points, scaled so that
                # the mean over the processes is the global batch's bound for the data set
                scale = self.num_data * self.world / size
                reported, stop = self.step_fn(batch, scale, self.kl_factor(self.step))
                self.step += 1
                record.add(reported, size)
                timed = record.step_seconds(TIMED_STEPS) if self.world > 1 else None
                if timed is not None:  # (under torchrun: the step time known)
                    distributed.set_collective_timeout(distributed.collective_timeout(timed))
                if self.budget_spent(record.seconds()):
                    break  # (max_steps or max_seconds: the epoch ends here, its record kept)
                if stop and record.done < self.steps_per_epoch:
                    self.position = record.position()
                    self.save()
                    raise self._preempted(record.done)
        self._epoch_seconds = record.seconds()
        return record.mean()

    def budget_spent(self, epoch_seconds: float = 0.0) -> bool:
        """Whether the run's budget is spent (:meth:`~pyro_vae.training.history.Budget.spent`)."""
        return self.budget.spent(self.step, self.history, epoch_seconds)

    def _preempted(self, steps: int | None = None) -> Preempted:
        """The stop a signal asked for, once the checkpoint holds the position."""
        saved = self.run_dir / CHECKPOINT if self.run_dir else None
        return preemption.preempted(self.epoch, steps, self.steps_per_epoch, saved)

    def compiles(self) -> bool:
        """Whether this run's steps replay a captured graph
        (:meth:`StepPath.compiles <pyro_vae.training.compilation.StepPath.compiles>`,
        with the steps left in the run)."""
        steps = max(0, self.config.epochs - self.epoch) * self.steps_per_epoch
        return self.path.compiles(steps)

    def run(
        self,
        callbacks: Iterable[Callback | Callable[[dict[str, Any]], None]] = (),
        progress: bool = True,
        log: Callable[[str], Any] | None = print,
    ) -> History:
        """Train until the configured epochs are done, early stopping ends the run, or
        its budget (``max_steps``, ``max_seconds``) is spent; return the history.
        ``callbacks`` (:class:`~pyro_vae.training.callbacks.Callback` objects, or
        functions called with each epoch's metrics) follow the trainer's own."""
        self.path.choose(self.config.epochs, self.compiles)
        self.callbacks = [
            self.evaluation,
            self.early_stopping,
            MetricsFile(),
            Checkpointing(),
            EpochLog(log, self.config.epochs),
            *(as_callback(callback) for callback in callbacks),
        ]
        # a run folder keeps the position on SIGTERM/SIGUSR1: they stop it after the step
        watching = preemption.watch() if self.run_dir is not None else contextlib.nullcontext(False)
        with watching:
            return self._run(progress)

    def _run(self, progress: bool) -> History:
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.epoch < self.config.epochs and not self.finished and not self.budget_spent():
            if self.run_dir is not None and preemption.stop_requested(self.world):
                raise self._preempted()
            train_elbo = self.train_epoch(progress)
            self.guard.check_epoch()
            self.epoch += 1
            metrics = self._record(train_elbo, self._epoch_seconds)
            self.history.epochs.append(metrics)
            stop = any([callback.should_stop(self, metrics) for callback in self.callbacks])
            self.finished = stop or self.epoch >= self.config.epochs or self.budget_spent()
            for callback in self.callbacks:
                callback.on_epoch_end(self, metrics)
        if self.run_dir is not None and preemption.stop_requested(self.world):
            raise self._preempted()  # (trained: the command's evaluation is left to the resume)
        for callback in self.callbacks:
            callback.on_train_end(self)
        return self.history

    def _record(self, train_elbo: float, seconds: float) -> dict[str, Any]:
        """The epoch's metrics: the step counts and bound, what the callbacks evaluate,
        the times, the learning rate and KL factor."""
        eval_started = time.perf_counter()
        evaluated = {k: v for c in self.callbacks for k, v in c.on_evaluate(self).items()}
        return {
            "epoch": self.epoch,
            "step": self.step,
            "train_elbo": train_elbo,
            **evaluated,
            "seconds": seconds,
            "eval_seconds": time.perf_counter() - eval_started,
            "lr": self.optimizer.param_groups[0]["lr"],
            "kl_factor": self.kl_factor(self.step - 1),  # of the epoch's last step
        }
