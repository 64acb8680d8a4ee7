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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.ops.integrator import potential_grad, velocity_verlet

from pyro_vae.analysis.diagnostics import frozen
from pyro_vae.analysis.evaluation import (
    DEFAULT_MAX_ELEMENTS,
    MAX_EVALUATION_SECONDS,
    _checked_once,
    _synchronize,
)
from pyro_vae.choices import AIS_SCHEDULES, AIS_STARTS
from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import ModelError, ModelSites, as_batch, evaluation_mode, model_sites
from pyro_vae.objectives.traces import (
    Site,
    particle_plate,
    per_datapoint,
    sample_sites,
    site_total,
)

#: where the chains start: the guide q(z|x), or the prior p(z)
STARTS = tuple(AIS_STARTS)
#: annealing schedules of beta_0 = 0 < ... < beta_T = 1
SCHEDULES = tuple(AIS_SCHEDULES)
#: the sigmoid schedule's sharpness (Grosse et al., 2015, use 4)
SIGMOID_SHARPNESS = 4.0
#: HMC acceptance rate the step size is tuned toward (Neal, 2011; Wu et al., 2017: 0.65)
TARGET_ACCEPTANCE = 0.65
#: change of log(step size) per transition, per unit of acceptance above the target
ADAPTATION_GAIN = 0.5


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


# ---------------------------------------------------------------------- the densities
class _Densities:
    """log p(x, z) and log f_0(z) of ``chains`` chains on a batch ``x``, from the traces.

    The chains' states are unconstrained and flat: ``{site: (chains, batch, n_site)}``.
    """

    def __init__(
        self, vae: Any, x: torch.Tensor, sites: ModelSites, chains: int, start: str
    ) -> None:
        self.vae, self.x, self.chains, self.start = vae, x, chains, start
        self.latent = sites.latent
        plate = particle_plate(chains)
        with torch.no_grad():
            if start == "guide":
                trace = poutine.trace(plate(vae.guide)).get_trace(x)
            else:
                trace = poutine.trace(plate(vae.model)).get_trace(x)
        nodes: dict[str, Site] = {name: trace.nodes[name] for name in self.latent}
        self.transforms, self.shapes = {}, {}
        for name, node in nodes.items():
            fn = node["fn"]
            if fn.support.is_discrete:
                raise ModelError(
                    f"latent site {name!r} is discrete ({type(fn).__name__}): AIS moves the "
                    f"latents by HMC, which needs continuous latent sites"
                )
            self.transforms[name] = biject_to(fn.support)
            self.shapes[name] = tuple(node["value"].shape[2:])
        self.initial_values: dict[str, torch.Tensor] = {n: v["value"] for n, v in nodes.items()}
        # a guide with one sample site: its distribution depends on x alone (no other
        # latent to condition on), so it is read once from the trace
        one_site = start == "guide" and len(self.latent) == 1
        self.guide_fn: Any = nodes[self.latent[0]]["fn"] if one_site else None

    def flat(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Constrained values ``(chains, batch, *event)`` -> flat unconstrained states."""
        flat = {}
        for name in self.latent:
            event = values[name].shape[-1 - len(self.shapes[name]) :]  # (batch, *event)
            value = values[name].expand(self.chains, *event)
            u = self.transforms[name].inv(value)
            flat[name] = u.reshape(self.chains, u.shape[1], -1).detach().clone()
        return flat

    def __call__(
        self, u: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log p(x, z), log f_0(z), log |dz/du|)`` per chain and data point ``(C, B)``."""
        batch = self.x.shape[0]
        z, log_jacobian = {}, torch.zeros((), dtype=self.x.dtype, device=self.x.device)
        for name in self.latent:
            flat = u[name].reshape(self.chains, batch, *self.shapes[name])
            value = self.transforms[name](flat)
            z[name] = value
            jac = self.transforms[name].log_abs_det_jacobian(flat, value)
            if torch.is_tensor(jac) and jac.dim() > 2:
                jac = jac.reshape(self.chains, batch, -1).sum(-1)
            log_jacobian = log_jacobian + jac
        plate = particle_plate(self.chains)
        model_trace = poutine.trace(poutine.condition(plate(self.vae.model), data=z)).get_trace(
            self.x
        )
        log_joint: torch.Tensor | float = 0.0
        log_prior: torch.Tensor | float = 0.0
        for site in sample_sites(model_trace):
            log_p = per_datapoint(site, site["fn"].log_prob(site["value"]), self.chains)
            log_joint = log_joint + log_p
            if site["name"] in self.latent:
                log_prior = log_prior + log_p
        if self.start == "prior":
            log_start = site_total(log_prior)
        elif self.guide_fn is not None:
            log_start = self.guide_fn.log_prob(z[self.latent[0]])
        else:
            guide_trace = poutine.trace(poutine.condition(plate(self.vae.guide), data=z)).get_trace(
                self.x
            )
            log_q: torch.Tensor | float = 0.0
            for site in sample_sites(guide_trace):
                log_q = log_q + per_datapoint(site, site["fn"].log_prob(site["value"]), self.chains)
            log_start = site_total(log_q)
        shape = (self.chains, batch)
        return (
            site_total(log_joint).expand(shape),
            log_start.expand(shape),
            log_jacobian.expand(shape),
        )


def _kinetic_grad(r: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(r)  # identity mass matrix: K(r) = |r|^2 / 2


def _squared_norm(values: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v.pow(2).sum(-1) for v in values.values())  # type: ignore[return-value]


class _Chains:
    """The state of the chains of one batch: positions and their cached log densities."""

    def __init__(self, densities: _Densities, u: dict[str, torch.Tensor]) -> None:
        self.densities = densities
        self.u = u
        with torch.no_grad():
            self.log_joint, self.log_start, self.log_jacobian = (t.detach() for t in densities(u))
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def log_f(self, beta: float, joint, start, jacobian) -> torch.Tensor:
        return start + beta * (joint - start) + jacobian

    def potential(self, beta: float) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """``-log f_beta`` summed over chains and points (each element's gradient is its
        own: the chains and points are independent), caching the per-element terms."""

        def potential_fn(u: dict[str, torch.Tensor]) -> torch.Tensor:
            joint, start, jacobian = self.densities(u)
            self.last = (joint.detach(), start.detach(), jacobian.detach())
            return -self.log_f(beta, joint, start, jacobian).sum()

        return potential_fn

    def hmc(self, beta: float, step_size: torch.Tensor, leapfrog: int) -> torch.Tensor:
        """One HMC transition leaving ``f_beta`` invariant; the acceptance probabilities."""
        potential_fn = self.potential(beta)
        grads, _ = potential_grad(potential_fn, self.u)
        energy = -self.log_f(beta, self.log_joint, self.log_start, self.log_jacobian)
        r = {name: torch.randn_like(value) for name, value in self.u.items()}
        hamiltonian = energy + 0.5 * _squared_norm(r)
        eps = step_size.view(1, -1, 1).to(energy.dtype)
        u_new, r_new, _, _ = velocity_verlet(
            self.u, r, potential_fn, _kinetic_grad, eps, leapfrog, grads
        )
        assert self.last is not None
        joint, start, jacobian = self.last
        new_hamiltonian = -self.log_f(beta, joint, start, jacobian) + 0.5 * _squared_norm(r_new)
        log_accept = (hamiltonian - new_hamiltonian).clamp(max=0.0)
        log_accept = torch.where(torch.isnan(log_accept), -math.inf, log_accept)
        accept = torch.rand_like(log_accept).log() < log_accept
        self.u = {
            name: torch.where(accept.unsqueeze(-1), u_new[name], value).detach()
            for name, value in self.u.items()
        }
        self.log_joint = torch.where(accept, joint, self.log_joint)
        self.log_start = torch.where(accept, start, self.log_start)
        self.log_jacobian = torch.where(accept, jacobian, self.log_jacobian)
        return log_accept.exp()


def _anneal(
    chains: _Chains,
    betas: torch.Tensor,
    estimate_chains: int,
    leapfrog: int,
    step_size: torch.Tensor,
    step_sizes: torch.Tensor | None,
    target_acceptance: float,
    on_step: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anneal along ``betas``; the log weights ``(C, B)`` of the first ``estimate_chains``
    (float64), their acceptance probabilities ``(B,)`` and the step sizes ``(B, T - 1)``.

    With ``step_sizes`` given, transition ``t`` uses ``step_sizes[:, t - 1]``; else the
    chains after the first ``estimate_chains`` adapt ``step_size`` from their own
    acceptance probabilities, transition by transition (see the module's docstring).
    """
    steps = len(betas) - 1
    batch = step_size.shape[0]
    log_w = torch.zeros(estimate_chains, batch, dtype=torch.float64, device=step_size.device)
    accepted = torch.zeros(batch, dtype=torch.float64, device=step_size.device)
    used = []
    log_eps = step_size.log()
    for t in range(1, steps + 1):
        increment = (chains.log_joint - chains.log_start)[:estimate_chains].to(torch.float64)
        log_w = log_w + float(betas[t] - betas[t - 1]) * increment
        if t < steps:
            eps = step_sizes[:, t - 1] if step_sizes is not None else log_eps.exp()
            used.append(eps)
            accept = chains.hmc(float(betas[t]), eps, leapfrog).to(torch.float64)
            accepted += accept[:estimate_chains].mean(0)
            if step_sizes is None and accept.shape[0] > estimate_chains:
                adapting = accept[estimate_chains:].mean(0).to(log_eps.dtype)
                log_eps = log_eps + ADAPTATION_GAIN * (adapting - target_acceptance)
        on_step()
    transitions = max(steps - 1, 1)
    sizes = torch.stack(used, 1) if used else torch.empty(batch, 0, device=step_size.device)
    return log_w, accepted / transitions if steps > 1 else accepted + math.nan, sizes


def _log_mean_and_se(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log mean_c w_c per point and its delta-method standard error, float64."""
    chains = log_w.shape[0]
    estimate = torch.logsumexp(log_w, 0) - math.log(chains)
    if chains < 2:
        return estimate, torch.full_like(estimate, math.nan)
    normalized = (log_w - log_w.max(0).values).exp()
    se = normalized.std(0) / (normalized.mean(0) * math.sqrt(chains))
    return estimate, se


def _check_options(
    steps: int, chains: int, leapfrog: int, start: str, schedule: str, step_size: float,
    adaptation_chains: int, target_acceptance: float,
) -> None:  # fmt: skip
    for name, value in (("steps", steps), ("chains", chains), ("leapfrog", leapfrog)):
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name} must be an integer >= 1, got {value!r}")
    if start not in STARTS:
        raise UserInputError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    if schedule not in SCHEDULES:
        raise UserInputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not step_size > 0:
        raise UserInputError(f"step_size must be > 0, got {step_size}")
    if not isinstance(adaptation_chains, int) or adaptation_chains < 0:
        raise UserInputError(
            f"adaptation_chains must be an integer >= 0 (0: a fixed step size), got "
            f"{adaptation_chains!r}"
        )
    if not 0 < target_acceptance < 1:
        raise UserInputError(f"target_acceptance must be in (0, 1), got {target_acceptance}")


def _batch_size(x: torch.Tensor, chains: int, batch_size: int | None) -> int:
    if batch_size is None:
        per_point = max(1, chains * (x[0].numel() if len(x) else 1))
        batch_size = max(1, min(len(x), DEFAULT_MAX_ELEMENTS // per_point))
    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


def _progress(total: int, label: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=label, unit="step", leave=False, disable=None if enabled else True
    )


def _evaluations(steps: int, leapfrog: int) -> int:
    """Gradient evaluations of the log densities per chain: ``leapfrog + 1`` per transition
    (the gradient at the start, then one per leapfrog step), one for the initial state."""
    return (steps - 1) * (leapfrog + 1) + 1


def _run(
    vae: Any,
    x: torch.Tensor,
    sites: ModelSites,
    *,
    steps: int,
    chains: int,
    leapfrog: int,
    start: str,
    schedule: str,
    step_size: float,
    adaptation_chains: int,
    target_acceptance: float,
    batch_size: int,
    bar: Any,
    exact: dict[str, torch.Tensor] | None = None,
    step_sizes: torch.Tensor | None = None,
) -> AISResult:
    """Forward AIS on ``x`` (``exact=None``), or reverse AIS from the latents ``exact``
    with the forward run's ``step_sizes`` ``(points, steps - 1)``."""
    started = time.perf_counter()
    reverse = exact is not None
    betas = annealing_schedule(steps, schedule)
    if reverse:
        betas = betas.flip(0)
        adaptation_chains = 0
    total = chains + adaptation_chains
    n = x.shape[0]
    estimates, errors, rates, sizes = [], [], [], []
    for begin in range(0, n, batch_size):
        batch = x[begin : begin + batch_size]
        densities = _Densities(vae, batch, sites, total, start)
        if exact is None:
            values = densities.initial_values
        else:
            values = {name: exact[name][begin : begin + batch_size] for name in sites.latent}
        state = _Chains(densities, densities.flat(values))
        given = None
        if step_sizes is not None:
            given = step_sizes[begin : begin + batch_size].to(batch.device, batch.dtype)
            given = given.flip(1) if reverse else given
        log_w, rate, used = _anneal(
            state,
            betas,
            chains,
            leapfrog,
            torch.full((batch.shape[0],), float(step_size), dtype=batch.dtype, device=batch.device),
            given,
            target_acceptance,
            lambda: bar.update(1),
        )
        estimate, error = _log_mean_and_se(log_w)
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
        start=start,
        schedule=schedule,
        adaptation_chains=adaptation_chains,
        direction="reverse" if reverse else "forward",
        evaluations=_evaluations(steps, leapfrog),
        seconds=time.perf_counter() - started,
    )


@contextmanager
def _annealing(vae: Any, x: torch.Tensor) -> Iterator[None]:
    """Eval mode, the networks' parameters as constants, autograd on (for the gradients
    in z), and the data checked once."""
    with evaluation_mode(vae), frozen(vae), _checked_once(vae, x), torch.enable_grad():
        yield


def ais_log_likelihood(
    model: Any,
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
    _check_options(
        steps, chains, leapfrog, start, schedule, step_size, adaptation_chains, target_acceptance
    )
    x = as_batch(model, x)
    sites = model_sites(model, x)
    size = _batch_size(x, chains + adaptation_chains, batch_size)
    label = f"AIS, T={steps}, C={chains}"
    with _annealing(model, x), _progress(math.ceil(len(x) / size) * steps, label, progress) as bar:
        return _run(
            model, x, sites, steps=steps, chains=chains, leapfrog=leapfrog, start=start,
            schedule=schedule, step_size=step_size, adaptation_chains=adaptation_chains,
            target_acceptance=target_acceptance, batch_size=size, bar=bar,
        )  # fmt: skip


def simulate(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
    value = trace.nodes[sites.observed[0]]["value"]
    if value.shape[0] != x.shape[0] or value[0].numel() != x[0].numel():
        raise ModelError(
            f"the observed site {sites.observed[0]!r} of {name} holds values of shape "
            f"{tuple(value.shape)}, not one per entry of x {tuple(x.shape)}: simulating data "
            f"needs the observed site to hold x"
        )
    latents = {site: trace.nodes[site]["value"].detach() for site in sites.latent}
    return value.detach().reshape(x.shape).to(x.dtype), latents


def bdmc(
    model: Any,
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
    _check_options(
        steps, chains, leapfrog, start, schedule, step_size, adaptation_chains, target_acceptance
    )
    data, latents = simulate(model, x)
    sites = model_sites(model, data)
    size = _batch_size(data, chains + adaptation_chains, batch_size)
    options: dict[str, Any] = {
        "steps": steps, "chains": chains, "leapfrog": leapfrog, "start": start,
        "schedule": schedule, "step_size": step_size, "target_acceptance": target_acceptance,
        "batch_size": size,
    }  # fmt: skip
    total = 2 * math.ceil(len(data) / size) * steps
    with (
        _annealing(model, data),
        _progress(total, f"BDMC, T={steps}, C={chains}", progress) as bar,
    ):
        forward = _run(model, data, sites, adaptation_chains=adaptation_chains, bar=bar, **options)
        reverse = _run(
            model, data, sites, adaptation_chains=0, bar=bar, exact=latents,
            step_sizes=forward.step_sizes, **options,
        )  # fmt: skip
    return BDMCResult(forward=forward, reverse=reverse, data=data.cpu())


# ---------------------------------------------------------------------- time
def ais_seconds(
    model: Any,
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
    size = _batch_size(x, total, batch_size)
    probe = x[:size]
    with _annealing(model, probe), pyro.validation_enabled(False):
        densities = _Densities(model, probe, sites, total, start)
        state = _Chains(densities, densities.flat(densities.initial_values))
        potential_fn = state.potential(0.5)
        potential_grad(potential_fn, state.u)
        _synchronize(probe)
        began = time.perf_counter()
        potential_grad(potential_fn, state.u)
        _synchronize(probe)
        seconds = time.perf_counter() - began
    return seconds * _evaluations(steps, leapfrog) * math.ceil(len(x) / size)


def announce_ais(
    model: Any,
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
    from pyro_vae.resources import human_seconds

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


__all__: Sequence[str] = (
    "AISResult",
    "BDMCResult",
    "annealing_schedule",
    "ais_log_likelihood",
    "bdmc",
    "simulate",
    "ais_seconds",
    "announce_ais",
)
