"""The ground truth itself: linear-Gaussian identities, and estimators on two layers."""

from __future__ import annotations

import math
import warnings

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae import log_importance_weights, log_likelihood, make_elbo
from pyro_vae.models.exact import LinearGaussianVAE, TwoLayerLinearGaussianVAE

from .helpers import assert_unbiased, flat_grads

N = 12


def _log_joint(vae, x, latents: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(x, z) per data point from the Pyro model itself, at given latents."""
    conditioned = poutine.condition(vae.model, data=latents)
    trace = poutine.trace(conditioned).get_trace(x)
    return sum(
        site["fn"].log_prob(site["value"]).double()
        for site in trace.nodes.values()
        if site["type"] == "sample"
    )


def test_one_layer_bayes_rule_holds_exactly():
    vae = LinearGaussianVAE.random(6, 3, noise_scale=0.7, seed=1)
    x = vae.marginal().sample((N,)).float()
    z = torch.randn(N, 3)
    # log p(x) = log p(x, z) - log p(z | x) for any z
    via_bayes = _log_joint(vae, x, {"z": z}) - vae.posterior(x).log_prob(z.double())
    torch.testing.assert_close(via_bayes, vae.log_marginal(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("guide_order", ["top-down", "bottom-up"])
def test_two_layer_bayes_rule_holds_exactly(guide_order):
    vae = TwoLayerLinearGaussianVAE.random(5, (3, 2), (0.6, 0.8), guide_order, seed=2)
    x = vae.marginal().sample((N,)).float()
    z1, z2 = torch.randn(N, 3), torch.randn(N, 2)
    log_posterior = vae.posterior(x).log_prob(torch.cat([z1, z2], -1).double())
    via_bayes = _log_joint(vae, x, {"z1": z1, "z2": z2}) - log_posterior
    torch.testing.assert_close(via_bayes, vae.log_marginal(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("guide_order", ["top-down", "bottom-up"])
def test_two_layer_guide_distribution_matches_the_guide(guide_order):
    vae = TwoLayerLinearGaussianVAE.random(5, (3, 2), (0.6, 0.8), guide_order, seed=2)
    x = vae.marginal().sample((N,)).float()
    trace = poutine.trace(vae.guide).get_trace(x)
    trace.compute_log_prob()
    log_q = (trace.nodes["z1"]["log_prob"] + trace.nodes["z2"]["log_prob"]).double()
    z = torch.cat([trace.nodes["z1"]["value"], trace.nodes["z2"]["value"]], -1).double()
    torch.testing.assert_close(vae.guide_distribution(x).log_prob(z), log_q, rtol=1e-5, atol=1e-4)


def test_guide_at_the_posterior_closes_the_gap():
    vae = LinearGaussianVAE.random(6, 3, noise_scale=0.7, seed=1, orthogonal=True)
    x = vae.marginal().sample((N,)).float()
    assert vae.kl_gap(x).min() > 0.01
    vae.set_guide_to_posterior()
    assert vae.kl_gap(x).abs().max() < 1e-4
    # every importance weight is then p(x): log w = log p(x) for every draw
    log_w = log_importance_weights(vae, x, 50).double()
    torch.testing.assert_close(log_w, vae.log_marginal(x).expand(50, N), rtol=1e-5, atol=1e-3)


def test_non_orthogonal_posterior_cannot_be_matched():
    vae = LinearGaussianVAE.random(6, 3, noise_scale=0.7, seed=1)
    with pytest.raises(ValueError, match="orthogonal=True"):
        vae.set_guide_to_posterior()


def _two_layer_draws(name, vae, x, repeats, num_particles):
    elbo = make_elbo(name, num_particles)
    losses, grads = [], []
    for _ in range(repeats):
        vae.zero_grad(set_to_none=True)
        losses.append(elbo.loss_and_grads(vae.model, vae.guide, x))
        grads.append(flat_grads(vae))
    return torch.tensor(losses, dtype=torch.float64), torch.stack(grads).double()


# every estimator whose objective is the ELBO: the averaging ones with 100 particles, the
# importance-weighted ones with one particle (where L_1 is the ELBO)
@pytest.mark.parametrize(
    "name,particles",
    [("mc", 100), ("analytic", 100), ("stl", 100), ("iwae", 1), ("renyi", 1), ("dreg", 1)],
)
def test_two_layer_top_down_values_and_gradients_are_unbiased(name, particles):
    vae = TwoLayerLinearGaussianVAE.random(5, (3, 2), (0.6, 0.8), "top-down", seed=4)
    x = vae.marginal().sample((N,)).float()
    losses, grads = _two_layer_draws(name, vae, x, repeats=300, num_particles=particles)
    exact = vae.exact_elbo(x).sum()
    vae.zero_grad(set_to_none=True)
    (-exact).backward()
    assert_unbiased(-losses[:, None], exact.detach()[None])
    assert_unbiased(grads, flat_grads(vae).double())


def test_two_layer_bottom_up_analytic_kl_is_biased_and_mc_is_not():
    vae = TwoLayerLinearGaussianVAE.random(5, (3, 2), (0.6, 0.8), "bottom-up", seed=4)
    x = vae.marginal().sample((N,)).float()
    exact = vae.exact_elbo(x).sum().detach()
    mc, _ = _two_layer_draws("mc", vae, x, repeats=200, num_particles=100)
    assert_unbiased(-mc[:, None], exact[None])
    with warnings.catch_warnings():
        # Pyro warns that it cannot verify the mean-field condition: that is the point
        warnings.simplefilter("ignore", UserWarning)
        analytic, _ = _two_layer_draws("analytic", vae, x, repeats=200, num_particles=100)
    bias = (-analytic).mean() - exact
    standard_error = analytic.std() / math.sqrt(200)
    assert bias.abs() > 10 * standard_error, (bias, standard_error)


def test_two_layer_log_likelihood_matches_exact_after_fitting_the_guide():
    vae = TwoLayerLinearGaussianVAE.random(5, (3, 2), (0.6, 0.8), "top-down", seed=4)
    x = vae.marginal().sample((N,)).float()
    # fit the guide to the exact ELBO (deterministic gradients), so K=5000 suffices
    optimizer = torch.optim.Adam(vae.inference.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        (-vae.exact_elbo(x).sum()).backward()
        optimizer.step()
    assert vae.kl_gap(x).mean() < 0.5
    pyro.set_rng_seed(0)
    estimate = log_likelihood(vae, x, num_samples=5000)
    exact = vae.log_marginal(x)
    log_w = log_importance_weights(vae, x, 5000).double()
    weights = (log_w - log_w.max(0).values).exp()
    relative_sd = weights.std(0) / weights.mean(0) / math.sqrt(5000)
    assert ((estimate - exact).abs() < 5 * relative_sd + 1e-4).all(), estimate - exact
    # and the ELBO < log p(x) ordering holds per point
    assert (vae.exact_elbo(x) < exact).all()
