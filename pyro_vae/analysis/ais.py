r"""Annealed importance sampling (AIS) of log p(x), and its bidirectional check (BDMC).

Importance sampling from the guide (:func:`~pyro_vae.analysis.evaluation.log_likelihood`)
is a lower bound that can sit nats below log p(x) when the guide is poor (PSIS k-hat
above 0.7). AIS (Neal, 2001) anneals from a normalized start ``f_0`` (the guide
``q(z|x)``, or the prior ``p(z)``) to the unnormalized posterior ``f_T = p(x, z)``
through the geometric path

.. math::
    f_t(z) = f_0(z)^{1 - \beta_t}\, p(x, z)^{\beta_t}, \qquad 0 = \beta_0 < \dots < \beta_T = 1,

moving each chain by HMC transitions that leave ``f_t`` invariant. The weight of a chain,
``w = prod_t f_t(z_{t-1}) / f_{t-1}(z_{t-1})``, has expectation ``p(x)`` exactly, so the
log of the mean of the chains' weights is a stochastic lower bound of log p(x) (Jensen),
and it reaches log p(x) as T grows. With ``T = 1`` it is importance sampling with as many
samples as chains.

BDMC (Grosse et al., 2015; Wu et al., 2017) runs the same chain backwards, from an exact
posterior sample: on data simulated from the model, the latent that generated each point
is one. The reverse weights have expectation ``1 / p(x)``, so minus the log of their mean
is a stochastic *upper* bound; the gap between the two bounds bounds the error of AIS
with that schedule and transitions on data like the model's.

The densities come from the model's own Pyro traces: ``model.model`` conditioned on the
chains' latent values gives ``log p(x, z)`` (every latent site of a hierarchical model
jointly, each in its unconstrained space with the Jacobian of Pyro's ``biject_to``), and
``model.guide`` conditioned on them gives ``log q(z|x)``. The leapfrog steps are Pyro's
:func:`pyro.ops.integrator.velocity_verlet`. Work is vectorized over data points and
chains (a particle plate left of the data plate), chunked over data points, and the log
weights are accumulated in float64.

How the step size is adapted and why the estimate stays valid: each data point has its
own HMC step size, tuned toward a target acceptance rate by a few *adaptation chains*
that run alongside the estimate's chains but whose weights are thrown away. The step
size of transition ``t`` is a function of the adaptation chains' transitions before
``t`` only; the estimate's chains never influence it. Conditionally on the adaptation
chains, every transition of the estimate's chains is therefore a fixed HMC kernel that
leaves ``f_t`` invariant, which is all AIS needs: ``E[w] = p(x)`` exactly, not only as
the adaptation settles. (Adapting each chain from its own past would make the kernels
depend on the state they move, and the weights would no longer be exact.) BDMC's reverse
chains reuse the forward run's step sizes, fixed before they start.

The chains themselves (densities, HMC transitions, annealing of one chunk) are in
:mod:`pyro_vae.analysis.ais_chains`; the time estimate made before a run
(:func:`~pyro_vae.analysis.ais_time.announce_ais`) in :mod:`pyro_vae.analysis.ais_time`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from pyro_vae.analysis.ais_chains import ADAPTATION_GAIN as ADAPTATION_GAIN
from pyro_vae.analysis.ais_chains import (
    Chains,
    Densities,
    anneal,
    annealing,
    chunk_size,
    evaluations,
    log_mean_and_se,
)
from pyro_vae.analysis.ais_time import ais_seconds as ais_seconds
from pyro_vae.analysis.ais_time import announce_ais as announce_ais
from pyro_vae.choices import AIS_SCHEDULES, AIS_STARTS
from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import (
    ModelError,
    ModelSites,
    PyroModel,
    as_batch,
    evaluation_mode,
    model_sites,
)

#: where the chains start: the guide q(z|x), or the prior p(z)
STARTS = tuple(AIS_STARTS)
#: annealing schedules of beta_0 = 0 < ... < beta_T = 1
SCHEDULES = tuple(AIS_SCHEDULES)
#: the sigmoid schedule's sharpness (Grosse et al., 2015, use 4)
SIGMOID_SHARPNESS = 4.0
#: HMC acceptance rate the step size is tuned toward (Neal, 2011; Wu et al., 2017: 0.65)
TARGET_ACCEPTANCE = 0.65


def annealing_schedule(steps: int, schedule: str = "sigmoid") -> torch.Tensor:
    r"""The inverse temperatures ``beta_0 = 0 < ... < beta_T = 1`` (``T + 1`` values, float64).

    ``"linear"``: ``beta_t = t / T``. ``"sigmoid"`` (Grosse et al., 2015): ``beta_t``
    proportional to ``sigmoid(delta (2 t / T - 1))``, rescaled to run from 0 to 1, with
    ``delta = 4``: more steps near both ends, where the log weights change fastest.
    """
    if steps < 1:
        raise UserInputError(f"steps must be >= 1, got {steps}")
    if schedule not in SCHEDULES:
        raise UserInputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    if schedule == "linear":
        return t
    s = torch.sigmoid(SIGMOID_SHARPNESS * (2 * t - 1))
    betas = (s - s[0]) / (s[-1] - s[0])
    betas[0], betas[-1] = 0.0, 1.0
    return betas


@dataclass(frozen=True)
class AISResult:
    """AIS estimates per data point (nats, float64), and how they were made.

    :param log_likelihood: log of the mean of the chains' weights: a stochastic lower
        bound of log p(x) (for a reverse run, minus the log of the mean of the reverse
        weights: a stochastic upper bound).
    :param standard_error: its standard error over the chains (delta method, ``std(w) /
        (mean(w) sqrt(C))``); NaN for one chain.
    :param acceptance_rate: mean HMC acceptance probability of the estimate's chains.
    :param step_size: mean HMC step size over the transitions, per data point.
    :param step_sizes: the step size of each transition, ``(points, steps - 1)``.
    :param evaluations: gradient evaluations of log p(x, z) per chain and data point.
    """

    log_likelihood: torch.Tensor
    standard_error: torch.Tensor
    acceptance_rate: torch.Tensor
    step_size: torch.Tensor
    step_sizes: torch.Tensor
    steps: int
    chains: int
    leapfrog: int
    start: str
    schedule: str
    adaptation_chains: int
    direction: str
    evaluations: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        """Means over the data points, as plain numbers (for JSON and reports)."""
        values = self.log_likelihood
        n = len(values)
        return {
            "log_likelihood": float(values.mean()),
            "log_likelihood_sem": float(values.std() / math.sqrt(n)) if n > 1 else math.nan,
            # the Monte Carlo error of the mean over points from the chains alone
            "chain_standard_error": float(self.standard_error.pow(2).sum().sqrt() / n),
            "acceptance_rate": float(self.acceptance_rate.mean()),
            "step_size": float(self.step_size.mean()),
            "points": n,
            "steps": self.steps,
            "chains": self.chains,
            "leapfrog": self.leapfrog,
            "start": self.start,
            "schedule": self.schedule,
            "adaptation_chains": self.adaptation_chains,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class BDMCResult:
    """Bidirectional Monte Carlo on data simulated from the model (Grosse et al., 2015).

    :param forward: AIS from the start to the posterior: its ``log_likelihood`` is the
        stochastic lower bound of log p(x) of each simulated point.
    :param reverse: AIS from the exact latent back to the start: its ``log_likelihood``
        is the stochastic upper bound.
    :param data: the simulated data points, in the shape of the ``x`` given.
    """

    forward: AISResult
    reverse: AISResult
    data: torch.Tensor

    @property
    def lower(self) -> torch.Tensor:
        """Stochastic lower bound of log p(x) per simulated point (forward AIS)."""
        return self.forward.log_likelihood

    @property
    def upper(self) -> torch.Tensor:
        """Stochastic upper bound of log p(x) per simulated point (reverse AIS)."""
        return self.reverse.log_likelihood

    @property
    def gap(self) -> torch.Tensor:
        """``upper - lower`` per point: the error bound on AIS for this model and schedule."""
        return self.upper - self.lower

    def summary(self) -> dict[str, Any]:
        """Means over the simulated points (for JSON and reports)."""
        gap = self.gap
        n = len(gap)
        return {
            "lower": float(self.lower.mean()),
            "upper": float(self.upper.mean()),
            "gap": float(gap.mean()),
            "gap_sem": float(gap.std() / math.sqrt(n)) if n > 1 else math.nan,
            "gap_max": float(gap.max()),
            "points": n,
            "acceptance_rate": float(
                (self.forward.acceptance_rate.mean() + self.reverse.acceptance_rate.mean()) / 2
            ),
            "seconds": self.forward.seconds + self.reverse.seconds,
        }


@dataclass(frozen=True)
class _Settings:
    """The options of one AIS or BDMC run, checked when made (one line naming what is
    wrong otherwise)."""

    steps: int
    chains: int
    leapfrog: int
    start: str
    schedule: str
    step_size: float
    adaptation_chains: int
    target_acceptance: float

    def __post_init__(self) -> None:
        for name in ("steps", "chains", "leapfrog"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserInputError(f"{name} must be an integer >= 1, got {value!r}")
        if self.start not in STARTS:
            raise UserInputError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.schedule not in SCHEDULES:
            raise UserInputError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if not self.step_size > 0:
            raise UserInputError(f"step_size must be > 0, got {self.step_size}")
        adaptation = self.adaptation_chains
        if not isinstance(adaptation, int) or adaptation < 0:
            raise UserInputError(
                f"adaptation_chains must be an integer >= 0 (0: a fixed step size), got "
                f"{adaptation!r}"
            )
        if not 0 < self.target_acceptance < 1:
            raise UserInputError(
                f"target_acceptance must be in (0, 1), got {self.target_acceptance}"
            )


def _progress(total: int, label: str, enabled: bool):
    return tqdm(
        total=total, desc=label, unit="step", leave=False, disable=None if enabled else True
    )


def _run(
    vae: PyroModel,
    x: torch.Tensor,
    sites: ModelSites,
    settings: _Settings,
    *,
    batch_size: int,
    bar: Any,
    exact: dict[str, torch.Tensor] | None = None,
    step_sizes: torch.Tensor | None = None,
) -> AISResult:
    """Forward AIS on ``x`` (``exact=None``), or reverse AIS from the latents ``exact``
    with the forward run's ``step_sizes`` ``(points, steps - 1)`` (and no adaptation
    chains)."""
    started = time.perf_counter()
    steps, chains, leapfrog = settings.steps, settings.chains, settings.leapfrog
    reverse = exact is not None
    betas = annealing_schedule(steps, settings.schedule)
    adaptation_chains = settings.adaptation_chains
    if reverse:
        betas = betas.flip(0)
        adaptation_chains = 0
    total = chains + adaptation_chains
    n = x.shape[0]
    estimates, errors, rates, sizes = [], [], [], []
    for begin in range(0, n, batch_size):
        batch = x[begin : begin + batch_size]
        densities = Densities(vae, batch, sites, total, settings.start)
        if exact is None:
            values = densities.initial_values
        else:
            values = {name: exact[name][begin : begin + batch_size] for name in sites.latent}
        state = Chains(densities, densities.flat(values))
        given = None
        if step_sizes is not None:
            given = step_sizes[begin : begin + batch_size].to(batch.device, batch.dtype)
            given = given.flip(1) if reverse else given
        first = torch.full(
            (batch.shape[0],), float(settings.step_size), dtype=batch.dtype, device=batch.device
        )
        log_w, rate, used = anneal(
            state,
            betas,
            chains,
            leapfrog,
            first,
            given,
            settings.target_acceptance,
            lambda: bar.update(1),
        )
        estimate, error = log_mean_and_se(log_w)
        estimates.append(-estimate if reverse else estimate)
        errors.append(error)
        rates.append(rate)
        sizes.append(used.flip(1) if reverse else used)
    step_table = torch.cat(sizes).to(torch.float64).cpu()
    return AISResult(
        log_likelihood=torch.cat(estimates).cpu(),
        standard_error=torch.cat(errors).cpu(),
        acceptance_rate=torch.cat(rates).cpu(),
        step_size=step_table.mean(1) if steps > 1 else torch.full((n,), math.nan),
        step_sizes=step_table,
        steps=steps,
        chains=chains,
        leapfrog=leapfrog,
        start=settings.start,
        schedule=settings.schedule,
        adaptation_chains=adaptation_chains,
        direction="reverse" if reverse else "forward",
        evaluations=evaluations(steps, leapfrog),
        seconds=time.perf_counter() - started,
    )


def ais_log_likelihood(
    model: PyroModel,
    x: torch.Tensor,
    steps: int = 500,
    chains: int = 16,
    leapfrog: int = 5,
    start: str = "guide",
    schedule: str = "sigmoid",
    step_size: float = 0.1,
    adaptation_chains: int = 4,
    target_acceptance: float = TARGET_ACCEPTANCE,
    batch_size: int | None = None,
    progress: bool = False,
) -> AISResult:
    r"""log p(x) per data point by annealed importance sampling, with HMC transitions.

    A stochastic lower bound of log p(x) that reaches it as ``steps`` grows (see the
    module's docstring for the estimator): ``chains`` independent chains per data point
    anneal from ``start`` (``"guide"``: q(z|x); ``"prior"``: p(z)) to p(z|x) over
    ``steps`` intermediate distributions spaced by ``schedule`` (``"sigmoid"`` or
    ``"linear"``, :func:`annealing_schedule`), each moved by one HMC transition of
    ``leapfrog`` steps (Pyro's ``velocity_verlet``). With ``steps=1`` it is importance
    sampling from ``start`` with ``chains`` samples.

    The step size starts at ``step_size`` and is adapted per data point toward
    ``target_acceptance`` by ``adaptation_chains`` extra chains whose weights are not used,
    so that the estimate stays exact in expectation (module docstring);
    ``adaptation_chains=0`` keeps ``step_size`` fixed. Data points are taken
    ``batch_size`` at a time (default: about ``2**21`` data values per chunk, chains
    included). Works for any model of the protocol (:mod:`pyro_vae.models.protocol`)
    with continuous latent sites, in eval mode, with the parameters held fixed.

    Returns an :class:`AISResult`: per data point the estimate, its standard error over
    the chains and the acceptance rate.
    """
    settings = _Settings(
        steps, chains, leapfrog, start, schedule, step_size, adaptation_chains, target_acceptance
    )
    x = as_batch(model, x)
    sites = model_sites(model, x)
    size = chunk_size(x, chains + adaptation_chains, batch_size)
    label = f"AIS, T={steps}, C={chains}"
    with annealing(model, x), _progress(math.ceil(len(x) / size) * steps, label, progress) as bar:
        return _run(model, x, sites, settings, batch_size=size, bar=bar)


def simulate(model: PyroModel, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Data simulated from ``model`` with the shape of ``x``, and the latents that made it.

    ``model.model`` runs with its observed site unconditioned (``poutine.uncondition``):
    each point's latent values are an exact draw from p(z | x_simulated). Needs one
    observed site holding one value per entry of a data point.
    """
    x = as_batch(model, x)
    sites = model_sites(model, x)
    name = type(model).__name__
    if len(sites.observed) != 1:
        raise ModelError(
            f"{name}.model has {len(sites.observed)} observed sites ({', '.join(sites.observed)}):"
            f" simulating data needs one observed site that holds x"
        )
    with torch.no_grad(), evaluation_mode(model), pyro.validation_enabled(False):
        trace = poutine.trace(poutine.uncondition(model.model)).get_trace(x)
    nodes: dict[str, Any] = trace.nodes
    value = nodes[sites.observed[0]]["value"]
    if value.shape[0] != x.shape[0] or value[0].numel() != x[0].numel():
        raise ModelError(
            f"the observed site {sites.observed[0]!r} of {name} holds values of shape "
            f"{tuple(value.shape)}, not one per entry of x {tuple(x.shape)}: simulating data "
            f"needs the observed site to hold x"
        )
    latents = {site: nodes[site]["value"].detach() for site in sites.latent}
    return value.detach().reshape(x.shape).to(x.dtype), latents


def bdmc(
    model: PyroModel,
    x: torch.Tensor,
    steps: int = 500,
    chains: int = 16,
    leapfrog: int = 5,
    start: str = "guide",
    schedule: str = "sigmoid",
    step_size: float = 0.1,
    adaptation_chains: int = 4,
    target_acceptance: float = TARGET_ACCEPTANCE,
    batch_size: int | None = None,
    progress: bool = False,
) -> BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al., 2015): the error of AIS, bounded.

    Simulates one data point from the model per point of ``x`` (its shape; the observed
    site unconditioned, :func:`simulate`), then runs, on each simulated point, forward AIS
    (a stochastic lower bound of its log p(x), as :func:`ais_log_likelihood` with the same
    options) and reverse AIS from the latent that generated it, an exact posterior draw
    (a stochastic upper bound), along the same schedule with the forward run's step sizes.
    ``gap = upper - lower`` per point bounds how far AIS with these options sits below
    log p(x) on data like the model's own. Returns a :class:`BDMCResult`.
    """
    settings = _Settings(
        steps, chains, leapfrog, start, schedule, step_size, adaptation_chains, target_acceptance
    )
    data, latents = simulate(model, x)
    sites = model_sites(model, data)
    size = chunk_size(data, chains + adaptation_chains, batch_size)
    total = 2 * math.ceil(len(data) / size) * steps
    with (
        annealing(model, data),
        _progress(total, f"BDMC, T={steps}, C={chains}", progress) as bar,
    ):
        forward = _run(model, data, sites, settings, batch_size=size, bar=bar)
        reverse = _run(
            model, data, sites, settings, batch_size=size, bar=bar, exact=latents,
            step_sizes=forward.step_sizes,
        )  # fmt: skip
    return BDMCResult(forward=forward, reverse=reverse, data=data.cpu())


__all__: Sequence[str] = (
    "AISResult",
    "BDMCResult",
    "annealing_schedule",
    "ais_log_likelihood",
    "bdmc",
    "simulate",
)
