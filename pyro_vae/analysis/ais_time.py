"""The time of AIS, estimated before it runs: one timed evaluation, scaled.

:func:`announce_ais` says the estimate when it is long and refuses a run that would take
longer than :data:`~pyro_vae.analysis.evaluation.MAX_EVALUATION_SECONDS`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.ops.integrator import potential_grad

from pyro_vae.analysis.ais_chains import Chains, Densities, annealing, chunk_size, evaluations
from pyro_vae.analysis.evaluation import MAX_EVALUATION_SECONDS, _synchronize
from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import PyroModel, as_batch, model_sites
from pyro_vae.resources import human_seconds


def ais_seconds(
    model: PyroModel,
    x: torch.Tensor,
    steps: int,
    chains: int,
    leapfrog: int = 5,
    start: str = "guide",
    adaptation_chains: int = 4,
    batch_size: int | None = None,
) -> float:
    """Estimated seconds of :func:`ais_log_likelihood` on ``x``, here: one gradient
    evaluation of the log densities on one chunk is timed (after a warm-up one) and
    scaled by the evaluations per chain (:attr:`AISResult.evaluations`) and the chunks."""
    x = as_batch(model, x)
    sites = model_sites(model, x)
    total = chains + adaptation_chains
    size = chunk_size(x, total, batch_size)
    probe = x[:size]
    with annealing(model, probe), pyro.validation_enabled(False):
        densities = Densities(model, probe, sites, total, start)
        state = Chains(densities, densities.flat(densities.initial_values))
        potential_fn = state.potential(0.5)
        potential_grad(potential_fn, state.u)
        _synchronize(probe)
        began = time.perf_counter()
        potential_grad(potential_fn, state.u)
        _synchronize(probe)
        seconds = time.perf_counter() - began
    return seconds * evaluations(steps, leapfrog) * math.ceil(len(x) / size)


def announce_ais(
    model: PyroModel,
    x: torch.Tensor,
    steps: int,
    chains: int,
    leapfrog: int = 5,
    start: str = "guide",
    bdmc: bool = False,
    log: Callable[[str], Any] | None = print,
) -> float:
    """Estimate the time of AIS (and of BDMC, twice as many chains' runs) before it starts:
    say it when it is long (over 10 s), refuse it when it is absurd (over 30 days)."""
    seconds = ais_seconds(model, x, steps, chains, leapfrog, start)
    what = f"AIS with T={steps:,}, {chains} chains, {leapfrog} leapfrog steps on {len(x):,} images"
    if bdmc:
        seconds *= 3  # forward AIS on the data, then forward and reverse on simulated data
        what += ", and BDMC on as many simulated ones"
    if seconds > MAX_EVALUATION_SECONDS:
        raise UserInputError(
            f"{what} would take about {human_seconds(seconds)} here: lower the number of "
            f"steps, chains or images"
        )
    if seconds > 10 and log is not None:
        log(f"{what}: about {human_seconds(seconds)} (estimated from one timed evaluation)")
    return seconds
