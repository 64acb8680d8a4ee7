"""The Pyro program: shapes, supports, scaling, helpers, and bad input."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import (
    DATA_PLATE,
    ESTIMATORS,
    LATENT_SITE,
    OBSERVED_SITE,
    ModelConfig,
    build_vae,
    elbo_terms,
    make_elbo,
)
from pyro_vae.errors import DataError

SHAPE = (1, 8, 8)
B = 6


def _data(likelihood: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if likelihood == "bernoulli":
        return torch.bernoulli(torch.full((B, 64), 0.3), generator=generator)
    if likelihood == "continuous_bernoulli":
        return torch.rand(B, 64, generator=generator)
    return torch.randn(B, 64, generator=generator)


LIKELIHOOD_CASES = [
    ("bernoulli", 1.0),
    ("continuous_bernoulli", 1.0),
    ("gaussian", 0.5),
    ("gaussian", None),  # learned scale
]


@pytest.mark.parametrize("network", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood,scale", LIKELIHOOD_CASES)
def test_every_likelihood_with_every_network(network, likelihood, scale):
    config = ModelConfig(
        latent_dims=(3,), hidden=(16,), network=network, likelihood=likelihood, gaussian_scale=scale
    )
    vae = build_vae(config, SHAPE)
    x = _data(likelihood)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    assert guide_trace.nodes[LATENT_SITE]["value"].shape == (B, 3)
    assert model_trace.nodes[OBSERVED_SITE]["fn"].event_shape == (64,)
    assert model_trace.nodes[OBSERVED_SITE]["cond_indep_stack"][0].name == DATA_PLATE
    for name in ESTIMATORS:
        loss = make_elbo(name, 3).loss(vae.model, vae.guide, x)
        assert torch.isfinite(torch.tensor(loss))
    terms = elbo_terms(vae, x, num_samples=2)
    assert terms.elbo.shape == terms.kl.shape == terms.expected_log_likelihood.shape == (B,)
    assert (terms.kl >= 0).all()
    loc, z_scale = vae.encode(x)
    assert loc.shape == z_scale.shape == (B, 3) and (z_scale > 0).all()
    assert vae.reconstruct(x).shape == x.shape
    assert vae.reconstruct(x.reshape(B, *SHAPE)).shape == (B, *SHAPE)
    assert vae.sample(5).shape == (5, *SHAPE)
    assert vae.sample(5, mean=False).shape == (5, *SHAPE)
    if likelihood != "gaussian":
        assert 0 <= vae.sample(5).min() and vae.sample(5).max() <= 1


def test_learned_gaussian_scale_is_trained():
    vae = build_vae(
        ModelConfig(latent_dims=(2,), hidden=(8,), likelihood="gaussian", gaussian_scale=None),
        SHAPE,
    )
    vae.zero_grad()
    make_elbo("mc").loss_and_grads(vae.model, vae.guide, _data("gaussian"))
    assert vae.likelihood.raw_scale.grad is not None
    assert vae.likelihood.raw_scale.grad.abs().sum() > 0


def test_minibatch_plate_scales_to_the_data_set():
    vae = build_vae(ModelConfig(latent_dims=(2,), hidden=(8,)), SHAPE)
    x = _data("bernoulli")
    for name in ("mc", "analytic", "iwae"):
        pyro.set_rng_seed(1)
        batch = make_elbo(name, 2).loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(1)
        scaled = make_elbo(name, 2).loss(vae.model, vae.guide, x, num_data=600)
        assert scaled == pytest.approx(batch * 600 / B, rel=1e-5)


def test_plain_svi_trains_the_library_model():
    vae = build_vae(ModelConfig(latent_dims=(2,), hidden=(16,)), SHAPE)
    x = torch.bernoulli(torch.full((64, 64), 0.2), generator=torch.Generator().manual_seed(0))
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO())
    before = [p.detach().clone() for p in vae.parameters()]
    losses = [svi.step(x) for _ in range(150)]
    assert all(not torch.equal(a, b) for a, b in zip(before, vae.parameters()))
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20


def test_a_second_model_trains_with_svi_without_clearing_the_param_store():
    x = torch.bernoulli(torch.full((64, 64), 0.2), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the second VAE reuses the names "encoder$$$..." of the first
        vae = build_vae(ModelConfig(latent_dims=(2,), hidden=(16,)), SHAPE)
        before = [p.detach().clone() for p in vae.parameters()]
        svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO())
        for _ in range(3):
            svi.step(x)
        assert all(not torch.equal(a, b) for a, b in zip(before, vae.parameters()))


def test_prior_is_configurable():
    vae = build_vae(ModelConfig(latent_dims=(2,), prior_loc=1.5, prior_scale=0.25), SHAPE)
    z = vae.prior().sample((20000,))
    assert z.mean().item() == pytest.approx(1.5, abs=0.01)  # sd of mean 0.25/sqrt(4e4)
    assert z.std().item() == pytest.approx(0.25, rel=0.02)


# ------------------------------------------------------------------------ bad input
@pytest.fixture
def bernoulli_vae():
    return build_vae(ModelConfig(latent_dims=(2,), hidden=(8,)), SHAPE)


def test_wrong_shape_is_refused(bernoulli_vae):
    with pytest.raises(DataError, match=r"expected data of shape \(batch, 64\)"):
        make_elbo("mc").loss(bernoulli_vae.model, bernoulli_vae.guide, torch.zeros(4, 63))
    with pytest.raises(DataError, match="expected data of shape"):
        bernoulli_vae.reconstruct(torch.zeros(4, 1, 7, 9))


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli"])
@pytest.mark.parametrize("value", [1.5, -0.1])
def test_values_outside_the_unit_interval_are_refused(likelihood, value):
    vae = build_vae(ModelConfig(latent_dims=(2,), hidden=(8,), likelihood=likelihood), SHAPE)
    x = _data("continuous_bernoulli")
    x[0, 3] = value
    with pytest.raises(DataError, match=r"outside \[0, 1\] required by the"):
        make_elbo("mc").loss(vae.model, vae.guide, x)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_nan_is_refused(likelihood):
    vae = build_vae(ModelConfig(latent_dims=(2,), hidden=(8,), likelihood=likelihood), SHAPE)
    x = _data(likelihood)
    x[1, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        make_elbo("analytic").loss(vae.model, vae.guide, x)


def test_gaussian_likelihood_accepts_real_values():
    vae = build_vae(ModelConfig(latent_dims=(2,), likelihood="gaussian"), SHAPE)
    vae.check_data(torch.randn(5, 64) * 10)


def test_conv_network_needs_a_grid_divisible_by_four():
    with pytest.raises(ValueError, match="multiples of 4"):
        build_vae(ModelConfig(network="conv"), (1, 10, 10))
