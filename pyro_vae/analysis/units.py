"""Which latent units a trained VAE uses: Burda et al.'s active-unit count, and the KL
carried by each unit (which units carry the KL that the count only flags).
"""

from __future__ import annotations

from typing import Any

import pyro
import torch

from pyro_vae.models.protocol import PyroModel, as_batch, evaluation_mode

#: Burda et al. (2016): a latent unit is active if Cov_x(E_q[z_u]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01


@torch.no_grad()
def active_units(
    vae: PyroModel,
    x: torch.Tensor,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
    parent_draws: int = 32,
) -> dict[str, Any]:
    """Latent units whose posterior mean varies over the data (Burda et al., 2016).

    ``A_u = Cov_x(E_{q(z|x)}[z_u]) > 0.01``, per latent site of the guide. Where a site's
    distribution depends on other latent draws (a lower layer of a hierarchical guide),
    ``E_q[z_u | x]`` is an expectation over those draws: it is estimated per data point
    by the mean of the conditional means at ``parent_draws`` draws, whose Monte Carlo
    variance (the within-x variance over ``parent_draws``) is estimated per data point
    and subtracted from the variance over x, so the estimate of ``Cov_x(E_q[z_u | x])``
    is unbiased. Sites whose distribution depends on x alone (every site of a one-layer
    guide) need one draw, and get one. Runs with the networks in eval mode.

    Returns the count over all sites, the number of latent dimensions, and per site its
    count, dimensions and the per-unit variance of the posterior mean.
    """
    import pyro
    from pyro import poutine

    from pyro_vae.objectives.traces import particle_plate, sample_sites

    def conditional_means(batch: torch.Tensor, draws: int) -> dict[str, torch.Tensor]:
        with pyro.validation_enabled(False):
            trace = poutine.trace(particle_plate(draws)(vae.guide)).get_trace(batch)
        means = {}
        for site in sample_sites(trace):
            mean = site["fn"].mean
            means[site["name"]] = mean.expand(draws, *mean.shape[-2:])  # (draws, batch, dims)
        return means

    with evaluation_mode(vae):
        x = as_batch(vae, x)
        probe = conditional_means(x[:1000], 2)
        depends_on_draws = any(not torch.equal(m[0], m[1]) for m in probe.values())
        draws = parent_draws if depends_on_draws else 1
        means: dict[str, list[torch.Tensor]] = {}
        within: dict[str, list[torch.Tensor]] = {}
        for start in range(0, x.shape[0], 1000):
            for name, m in conditional_means(x[start : start + 1000], draws).items():
                means.setdefault(name, []).append(m.mean(0))
                spread = m.var(0) / draws if draws > 1 else torch.zeros_like(m[0])
                within.setdefault(name, []).append(spread)
    per_site = {}
    for name, chunks in means.items():
        values = torch.cat(chunks)
        # one data point shows no variation over x: no unit can be counted active
        between = values.var(0) if values.shape[0] > 1 else torch.zeros_like(values[0])
        variance = between - torch.cat(within[name]).mean(0)
        per_site[name] = {
            "active": int((variance > threshold).sum()),
            "dims": int(variance.numel()),
            "variance": variance.cpu().tolist(),
            "parent_draws": draws,
        }
    return {
        "active_units": sum(site["active"] for site in per_site.values()),
        "latent_dims": sum(site["dims"] for site in per_site.values()),
        "by_site": per_site,
    }


@torch.no_grad()
def kl_per_unit(vae: PyroModel, x: torch.Tensor, num_samples: int = 8) -> dict[str, list[float]]:
    """Mean ``KL(q(z_u | x, parents) || p(z_u | parents))`` of each latent unit over
    ``x`` (and ``num_samples`` draws of the parents, for lower layers), per latent site,
    in nats: which units carry the KL that Burda's variance count only flags. Sites
    whose distributions are not factorized Normals (no per-unit closed form) are
    skipped. Runs with the networks in eval mode.
    """
    from torch.distributions import Independent, Normal, kl_divergence

    from pyro_vae.objectives.traces import sample_sites, vectorized_traces

    result: dict[str, list[float]] = {}
    with evaluation_mode(vae), pyro.validation_enabled(False):
        x = as_batch(vae, x)
        sums: dict[str, torch.Tensor] = {}
        for start in range(0, x.shape[0], 1000):
            model_trace, guide_trace = vectorized_traces(
                vae.model, vae.guide, x[start : start + 1000], num_samples
            )
            for site in sample_sites(model_trace):
                if site["is_observed"] or site["name"] not in guide_trace.nodes:
                    continue
                q, p = guide_trace.nodes[site["name"]]["fn"], site["fn"]
                q, p = (d.base_dist if isinstance(d, Independent) else d for d in (q, p))
                if not (isinstance(q, Normal) and isinstance(p, Normal)):
                    continue
                kl = kl_divergence(q, p)  # (batch, units), or (draws, batch, units)
                kl = kl.expand(num_samples, *kl.shape[-2:])
                per_unit = kl.sum((0, 1)) / num_samples  # summed over x, averaged over draws
                sums[site["name"]] = sums.get(site["name"], 0) + per_unit
        for name, total in sums.items():
            result[name] = (total / x.shape[0]).cpu().tolist()
    return result
