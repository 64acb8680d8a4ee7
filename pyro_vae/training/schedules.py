"""Learning-rate schedules (constant, exponential, cosine, the IWAE paper's), KL
warm-up, and the optimizer."""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample

from pyro_vae.config import IWAE_STAGES, TrainConfig


class LatentScale(Messenger):
    """Multiply the log-densities of every latent (unobserved) site by ``factor``.

    Applied to model and guide alike, it scales ``log p(z) - log q(z|x)``, i.e. the KL
    term, by ``factor``: the KL warm-up of Bowman et al. (2016) and Sonderby et al.
    (2016). The observed site is untouched.
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def _process_message(self, msg: Message[Any, Any]) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = msg["scale"] * self.factor


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based), in closed form.

    ``constant``: ``lr``; ``exponential``: ``lr * lr_gamma**epoch``; ``cosine``:
    ``lr * (1 + cos(pi * epoch / epochs)) / 2``, annealing to zero at the last epoch of
    the run as it is configured now (a run extended with more epochs anneals to its new
    end); ``iwae``: ``lr * 10**(-i/7)`` in stage ``i`` = 0..7 of the IWAE paper, which
    lasts ``3**i`` passes (epochs 0, then 1-3, then 4-12, ...; 3280 in all, the last
    stage's rate after that). A pure function of the epoch: a resumed run needs no
    scheduler state.

    References:
    [1] Burda, Grosse, Salakhutdinov (2016), Importance Weighted Autoencoders, ICLR.
    """
    if config.lr_schedule == "iwae":
        return config.lr * 10 ** (-iwae_stage(epoch) / 7)
    if config.lr_schedule == "exponential":
        return config.lr * config.lr_gamma**epoch
    if config.lr_schedule == "cosine":
        return config.lr * (1 + math.cos(math.pi * min(epoch, config.epochs) / config.epochs)) / 2
    return config.lr


def iwae_stage(epoch: int) -> int:
    """The stage ``i`` (0..7) of the IWAE paper's schedule that epoch ``epoch`` (0-based)
    falls in: stage ``i`` lasts ``3**i`` passes; after the last, the last."""
    stage, end = 0, 1
    while epoch >= end and stage < IWAE_STAGES - 1:
        stage += 1
        end += 3**stage
    return stage


def make_adam(parameters: list[torch.Tensor], lr: float, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam with the fused kernel where available (one kernel for all parameters instead
    of a dozen ops per parameter)."""
    try:
        return torch.optim.Adam(parameters, lr=lr, eps=eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(parameters, lr=lr, eps=eps)
