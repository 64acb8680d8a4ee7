"""How a run updates its parameters: the optimizer, the learning-rate schedule, the
largest gradient a step may take, decided outside the trainer.

:func:`~pyro_vae.training.fit.fit` builds an :class:`Optimization` from the run's
:class:`~pyro_vae.config.TrainConfig` and hands it to the
:class:`~pyro_vae.training.trainer.Trainer`, which only builds the optimizer over the
model's parameters, steps it and sets each epoch's rate. The optimizer is a
``torch.optim`` optimizer over the VAE's parameters, whose ``state_dict`` covers every
parameter whether or not it has stepped (Pyro's ``PyroOptim.get_state`` covers only
those that have, so a load-then-save before a step would lose state); its state is what
a checkpoint keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pyro_vae.config import TrainConfig
from pyro_vae.training.schedules import learning_rate, make_adam

#: a learning-rate schedule: the rate of each epoch (0-based)
Schedule = Callable[[int], float]
#: Adam squares every gradient entry into its second moment: entries above this overflow
#: float32 there (sqrt of float32's largest value), leaving inf in the optimizer state
GRADIENT_LIMIT = math.sqrt(torch.finfo(torch.float32).max)


def build_optimizer(
    parameters: Sequence[torch.Tensor], config: TrainConfig
) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``parameters``: Adam (fused where available) or Pyro's
    ``ClippedAdam`` (gradients clipped to ``config.clip_norm``), with ``config.lr`` and
    ``config.adam_epsilon``."""
    if config.optimizer == "adam":
        return make_adam(list(parameters), config.lr, config.adam_epsilon)
    from pyro.optim.clipped_adam import ClippedAdam

    optimizer: torch.optim.Optimizer = ClippedAdam(
        list(parameters), lr=config.lr, eps=config.adam_epsilon, clip_norm=config.clip_norm
    )
    return optimizer


def build_schedule(config: TrainConfig) -> Schedule:
    """The learning rate of each epoch under ``config``
    (:func:`~pyro_vae.training.schedules.learning_rate`)."""

    def schedule(epoch: int) -> float:
        return learning_rate(config, epoch)

    return schedule


def gradient_limit(optimizer: str) -> float:
    """The largest gradient entry a step may take: :data:`GRADIENT_LIMIT` for Adam, no
    limit for ``clipped_adam`` (it clamps each entry to ``clip_norm`` first)."""
    return GRADIENT_LIMIT if optimizer == "adam" else math.inf


@dataclass(frozen=True)
class Optimization:
    """How a run's parameters are updated."""

    #: the optimizer over the parameters (built by the trainer once the model has run,
    #: so that a lazy module has its parameters)
    build: Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer]
    #: the learning rate of each epoch (0-based)
    schedule: Schedule
    #: the largest gradient entry a step may take
    gradient_limit: float


def optimization(config: TrainConfig) -> Optimization:
    """The optimizer, schedule and gradient limit of ``config``."""

    def build(parameters: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
        return build_optimizer(parameters, config)

    return Optimization(build, build_schedule(config), gradient_limit(config.optimizer))
