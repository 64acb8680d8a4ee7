"""Callbacks: what runs around the training loop, and the extension point for users.

A :class:`Callback` has five hooks, each a no-op by default; the trainer calls them in
the order of its callbacks, its own first:

- ``on_train_start(trainer)``: once, before the first epoch of this call;
- ``on_evaluate(trainer)``: after each epoch, metrics to add to the epoch's record
  (they come after ``train_elbo`` in it, in callback order);
- ``should_stop(trainer, metrics)``: after the record is made, before the epoch's
  metrics and checkpoint are written: ``True`` ends the run after this epoch (every
  callback is asked);
- ``on_epoch_end(trainer, metrics)``: the epoch recorded and ``trainer.finished`` set;
- ``on_train_end(trainer)``: once, when the run ends (not on a preemption or an error).

The trainer's own, in order: :class:`Evaluation` (the test and validation ELBO),
:class:`EarlyStopping` (and the best checkpoint), :class:`MetricsFile`
(``metrics.jsonl``), :class:`Checkpointing` (``checkpoint.pt``), :class:`EpochLog` (the
console line). ``fit``'s ``callbacks`` follow them; a plain function there is called
with each epoch's metrics dict (:class:`FunctionCallback`), as TensorBoard's logger is.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyro
import torch

from pyro_vae import distributed
from pyro_vae.analysis.evaluation import checked_kl, elbo_means, fixed_subset
from pyro_vae.analysis.units import active_units
from pyro_vae.data import VAEData
from pyro_vae.io import atomic_write_text, dumps_json
from pyro_vae.models.protocol import PyroModel, evaluation_mode, forked_rng
from pyro_vae.training.checkpoint import BEST_CHECKPOINT, METRICS, load_checkpoint
from pyro_vae.training.history import History, format_epoch


class TrainerView(Protocol):
    """What a callback sees of the trainer
    (:class:`pyro_vae.training.trainer.Trainer` is one)."""

    #: the model (the protocol's view, and the same object as a torch module)
    vae: PyroModel
    module: torch.nn.Module
    data: VAEData
    #: the run folder (``None``: a run without one)
    run_dir: Path | None
    #: epochs finished, optimizer steps taken
    epoch: int
    step: int
    history: History
    #: whether the run ends after this epoch
    finished: bool
    parameters: list[torch.Tensor]
    optimizer: torch.optim.Optimizer

    def save(self, path: Path | None = None) -> None:
        """Checkpoint the run (to ``path``; default: the run folder's checkpoint)."""


class Callback:
    """The hooks of the training loop (see the module's docs); override those you need."""

    def on_train_start(self, trainer: TrainerView) -> None:
        """Before the first epoch of this call (a resumed run: its next epoch)."""

    def on_evaluate(self, trainer: TrainerView) -> dict[str, Any]:
        """Metrics measured after each epoch, added to the epoch's record."""
        return {}

    def should_stop(self, trainer: TrainerView, metrics: dict[str, Any]) -> bool:
        """Whether the run ends after this epoch (asked before the epoch is written)."""
        return False

    def on_epoch_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        """After each epoch, with its record (``trainer.history.last``)."""

    def on_train_end(self, trainer: TrainerView) -> None:
        """When the run ends: its epochs done, stopped early, or out of budget."""


class FunctionCallback(Callback):
    """A plain function called with each epoch's metrics dict, as a callback."""

    def __init__(self, function: Callable[[dict[str, Any]], None]) -> None:
        self.function = function

    def on_epoch_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        self.function(metrics)


def as_callback(callback: Callback | Callable[[dict[str, Any]], None]) -> Callback:
    """``callback`` itself, or a plain function as a :class:`FunctionCallback`."""
    return callback if isinstance(callback, Callback) else FunctionCallback(callback)


class Evaluation(Callback):
    """Test (and validation) ELBO with its terms and active units after each epoch, with
    an RNG forked from the run's, in eval mode (the networks' modes are restored
    afterwards). The test set is :meth:`monitor_images`; ``test_images`` says how many.
    The model's checks (:func:`~pyro_vae.analysis.evaluation.checked_kl`) run after the
    first epoch only: one callback serves one run of one model."""

    def __init__(self, seed: int, particles: int, device: str, monitor_images: int | None) -> None:
        self.seed, self.particles, self.device = seed, particles, device
        self.count = monitor_images
        self._monitor: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kl: str | None = None

    def monitor_images(self, trainer: TrainerView) -> torch.Tensor:
        """The test images evaluated after every epoch: all of them, or with
        ``monitor_images`` a fixed random subset of that many (the same in every run and
        epoch: a seeded permutation, so that curves are comparable; not the first
        images, since MNIST's first 5,000 test images are the easier half). The full test
        set is evaluated at the end of a run (``pyro-vae train``, ``evaluate``)."""
        images = trainer.data.evaluation_images("test")
        if self._monitor is None or self._monitor[0] is not images:
            self._monitor = (images, fixed_subset(images, self.count))
        return self._monitor[1]

    def on_evaluate(self, trainer: TrainerView) -> dict[str, Any]:
        vae, data = trainer.vae, trainer.data
        metrics: dict[str, Any] = {}
        with forked_rng(), pyro.validation_enabled(False), evaluation_mode(vae):
            torch.manual_seed(self.seed * 100_003 + trainer.epoch)
            splits = [("test", self.monitor_images(trainer))]
            if len(data.validation):
                splits.append(("validation", data.evaluation_images("validation")))
            if self._kl is None:  # the model's checks, once per run (they trace it)
                self._kl = checked_kl(vae, splits[0][1])
            for split, images in splits:
                values = elbo_means(vae, images, self.particles, self._kl, self.device)
                metrics.update({f"{split}_{name}": value for name, value in values.items()})
            units = active_units(vae, splits[0][1].to(self.device))
            metrics["test_images"] = len(splits[0][1])
            metrics["test_active_units"] = units["active_units"]
            if len(units["by_site"]) > 1:
                for site, counts in units["by_site"].items():
                    metrics[f"test_active_units_{site}"] = counts["active"]
        return metrics


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs without a better validation ELBO (none: never),
    keeping the best epoch's model (``best.pt`` in a run folder) and going back to it
    when the run stops early. Without a validation set it does nothing."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best_elbo = -math.inf
        self.epochs_since_best = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def should_stop(self, trainer: TrainerView, metrics: dict[str, Any]) -> bool:
        if "validation_elbo" not in metrics:
            return False
        if metrics["validation_elbo"] > self.best_elbo:
            self.best_elbo = metrics["validation_elbo"]
            trainer.history.best_epoch = trainer.epoch
            self.epochs_since_best = 0
            self._best_state = copy.deepcopy(trainer.module.state_dict())
            run_dir = trainer.run_dir
            trainer.save(run_dir / BEST_CHECKPOINT if run_dir else None)
            return False
        self.epochs_since_best += 1
        if self.patience and self.epochs_since_best >= self.patience:
            trainer.history.stopped_early = True
            return True
        return False

    def on_train_end(self, trainer: TrainerView) -> None:
        if trainer.history.stopped_early and trainer.run_dir is not None:
            best = load_checkpoint(trainer.run_dir / BEST_CHECKPOINT)["model"]
            trainer.module.load_state_dict(best)
        elif trainer.history.stopped_early and self._best_state is not None:
            trainer.module.load_state_dict(self._best_state)


class MetricsFile(Callback):
    """``metrics.jsonl`` in the run folder, one line per epoch, rewritten whole after
    each epoch (and when a run is resumed, so that it matches the checkpoint again)."""

    def on_train_start(self, trainer: TrainerView) -> None:
        if not (trainer.epoch == 0 and trainer.step == 0) and trainer.history.epochs:
            self.write(trainer)  # resumed: metrics.jsonl matches the checkpoint again

    def on_epoch_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        # metrics first: a kill between the two leaves metrics one epoch ahead of the
        # checkpoint, which the resumed run rewrites (the other order loses a line)
        self.write(trainer)

    @staticmethod
    def write(trainer: TrainerView) -> None:
        if trainer.run_dir is None or not distributed.is_main():
            return
        lines = "".join(dumps_json(epoch) + "\n" for epoch in trainer.history.epochs)
        atomic_write_text(lines, Path(trainer.run_dir) / METRICS)


class Checkpointing(Callback):
    """``checkpoint.pt``: one from the start of a new run, then one after each epoch."""

    def on_train_start(self, trainer: TrainerView) -> None:
        if trainer.epoch == 0 and trainer.step == 0:
            trainer.save()  # a good checkpoint exists from the start

    def on_epoch_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        trainer.save()


class EpochLog(Callback):
    """The console line of each epoch (:func:`~pyro_vae.training.history.format_epoch`),
    passed to ``log`` by the first process."""

    def __init__(self, log: Callable[[str], Any] | None, epochs: int) -> None:
        self.log, self.epochs = log, epochs

    def on_epoch_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if self.log is not None and distributed.is_main():
            self.log(format_epoch(metrics, self.epochs))
