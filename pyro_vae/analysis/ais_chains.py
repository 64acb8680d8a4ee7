"""The chains of AIS: their densities from the model's traces, HMC transitions, annealing.

The estimator, its step-size adaptation and why the estimate stays exact are described in
:mod:`pyro_vae.analysis.ais`, which runs these chains chunk by chunk; this module holds
the machinery: :class:`Densities` (log p(x, z) and log f_0(z) of a batch of chains),
:class:`Chains` (their states, moved by HMC transitions of Pyro's ``velocity_verlet``) and
:func:`anneal` (one chunk's chains along the schedule, their log weights in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.ops.integrator import potential_grad, velocity_verlet

from pyro_vae.analysis.diagnostics import frozen
from pyro_vae.analysis.evaluation import DEFAULT_MAX_ELEMENTS, _checked_once
from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import ModelError, ModelSites, PyroModel, evaluation_mode
from pyro_vae.objectives.traces import Site, particle_plate, per_datapoint, sample_sites, site_total

#: change of log(step size) per transition, per unit of acceptance above the target
ADAPTATION_GAIN = 0.5


class Densities:
    """log p(x, z) and log f_0(z) of ``chains`` chains on a batch ``x``, from the traces.

    The chains' states are unconstrained and flat: ``{site: (chains, batch, n_site)}``.
    """

    def __init__(
        self, vae: PyroModel, x: torch.Tensor, sites: ModelSites, chains: int, start: str
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


class Chains:
    """The state of the chains of one batch: positions and their cached log densities."""

    def __init__(self, densities: Densities, u: dict[str, torch.Tensor]) -> None:
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


def anneal(
    chains: Chains,
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


def log_mean_and_se(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log mean_c w_c per point and its delta-method standard error, float64."""
    chains = log_w.shape[0]
    estimate = torch.logsumexp(log_w, 0) - math.log(chains)
    if chains < 2:
        return estimate, torch.full_like(estimate, math.nan)
    normalized = (log_w - log_w.max(0).values).exp()
    se = normalized.std(0) / (normalized.mean(0) * math.sqrt(chains))
    return estimate, se


def chunk_size(x: torch.Tensor, chains: int, batch_size: int | None) -> int:
    """Data points per chunk: ``batch_size``, or about ``DEFAULT_MAX_ELEMENTS`` data values
    of ``chains`` chains at once."""
    if batch_size is None:
        per_point = max(1, chains * (x[0].numel() if len(x) else 1))
        batch_size = max(1, min(len(x), DEFAULT_MAX_ELEMENTS // per_point))
    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


def evaluations(steps: int, leapfrog: int) -> int:
    """Gradient evaluations of the log densities per chain: ``leapfrog + 1`` per transition
    (the gradient at the start, then one per leapfrog step), one for the initial state."""
    return (steps - 1) * (leapfrog + 1) + 1


@contextmanager
def annealing(vae: PyroModel, x: torch.Tensor) -> Iterator[None]:
    """Eval mode, the networks' parameters as constants, autograd on (for the gradients
    in z), and the data checked once."""
    with evaluation_mode(vae), frozen(vae), _checked_once(vae, x), torch.enable_grad():
        yield
