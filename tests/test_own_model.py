"""A user's own Pyro model through every tool: written here as Pyro's VAE tutorial writes
one (its own networks, sites named ``latent`` and ``obs``, ``pyro.module`` calls,
``pyro.plate("data", ...)``, ``model(x)``/``guide(x)`` with no other argument), and a
linear-Gaussian object with nothing but ``model`` and ``guide``."""

from __future__ import annotations

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_vae
from pyro_vae.config import TrainConfig
from pyro_vae.data import load_data
from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import ModelError, model_sites
from pyro_vae.objectives.capture import GraphCache


class Encoder(nn.Module):
    def __init__(self, z_dim: int, hidden_dim: int, x_dim: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(x_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()
        self.x_dim = x_dim

    def forward(self, x):
        x = x.reshape(-1, self.x_dim)
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim: int, hidden_dim: int, x_dim: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, x_dim)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        return self.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class TutorialVAE(nn.Module):
    """Pyro's VAE tutorial, on 8x8 digits."""

    def __init__(self, z_dim: int = 4, hidden_dim: int = 32):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, 64),
            )

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


class LinearGaussian:
    """x = W z + b + sigma eps, z ~ N(0, I); an amortized Gaussian guide, deliberately
    wider than the exact posterior. Only ``model`` and ``guide``: no module, no flatten,
    no data_dim, no site names declared."""

    def __init__(self, data_dim: int = 5, latent_dim: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(data_dim, latent_dim, generator=g)
        self.b = torch.randn(data_dim, generator=g)
        self.sigma = 0.7
        # exact posterior: precision A = I + W^T W / s^2, mean A^-1 W^T (x - b) / s^2
        precision = torch.eye(latent_dim) + self.W.T @ self.W / self.sigma**2
        self.post_cov = torch.linalg.inv(precision)
        self.post_gain = self.post_cov @ self.W.T / self.sigma**2

    def model(self, x):
        with pyro.plate("points", x.shape[0]):
            z = pyro.sample("code", dist.Normal(0.0, 1.0).expand([self.W.shape[1]]).to_event(1))
            pyro.sample("data", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("points", x.shape[0]):
            loc = (x - self.b) @ self.post_gain.T
            scale = 1.3 * self.post_cov.diagonal().sqrt()
            pyro.sample("code", dist.Normal(loc, scale.expand_as(loc)).to_event(1))

    def exact_log_marginal(self, x):
        covariance = self.W @ self.W.T + self.sigma**2 * torch.eye(self.W.shape[0])
        return torch.distributions.MultivariateNormal(self.b, covariance).log_prob(x)

    def sample(self, n, g):
        z = torch.randn(n, self.W.shape[1], generator=g)
        return z @ self.W.T + self.b + self.sigma * torch.randn(n, self.W.shape[0], generator=g)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", binarize="static")


def tiny_config(**overrides) -> TrainConfig:
    settings = dict(epochs=2, batch_size=100, lr=3e-3, estimator="mc", monitor_images=100)
    settings.update(overrides)
    return TrainConfig(**settings)


# ------------------------------------------------------------------ discovery
def test_sites_are_found_from_the_traces():
    x = torch.rand(3, 64).bernoulli()
    sites = model_sites(TutorialVAE(), x)
    assert sites.latent == ("latent",) and sites.observed == ("obs",)
    assert sites.data_plate == "data"
    sites = model_sites(LinearGaussian(), torch.randn(3, 5))
    assert sites == pyro_vae.ModelSites(latent=("code",), observed=("data",), data_plate="points")


def test_a_model_that_does_not_fit_the_protocol_gets_one_line_saying_what_it_needs():
    x = torch.randn(3, 5)

    class NoGuide:
        def model(self, x):
            pass

    class NoObserved(LinearGaussian):
        def model(self, x):
            with pyro.plate("points", x.shape[0]):
                pyro.sample("code", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    class GuideMissesASite(LinearGaussian):
        def model(self, x):
            with pyro.plate("points", x.shape[0]):
                z = pyro.sample("code", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
                pyro.sample("extra", dist.Normal(0.0, 1.0))
                pyro.sample("data", dist.Normal(z @ self.W.T, 1.0).to_event(1), obs=x)

    class NoPlate(LinearGaussian):
        def model(self, x):
            z = pyro.sample("code", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(2))
            pyro.sample("data", dist.Normal(z @ self.W.T, 1.0).to_event(2), obs=x)

        def guide(self, x):
            pyro.sample("code", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(2))

    class TakesNumData(LinearGaussian):
        def model(self, x, num_data):
            super().model(x)

    cases = [
        (NoGuide(), "no guide method"),
        (NoObserved(), "no observed site"),
        (GuideMissesASite(), "does not sample the model's latent site(s) extra"),
        (NoPlate(), "not inside a plate over the data points"),
        (TakesNumData(), "only argument"),
    ]
    for model, message in cases:
        with pytest.raises(ModelError, match=re.escape(message)) as error:
            pyro_vae.log_likelihood(model, x, num_samples=10)
        assert len(str(error.value).splitlines()) == 1
        assert isinstance(error.value, UserInputError)  # the CLI's exit status 2


# ------------------------------------------------------------------ the tools
def test_linear_gaussian_with_only_model_and_guide_gets_log_likelihood_within_0_05_nats():
    lg = LinearGaussian()
    x = lg.sample(50, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    estimate = pyro_vae.log_likelihood(lg, x, num_samples=20000)
    exact = lg.exact_log_marginal(x)
    # the guide is 1.3x wider than the posterior: weights of variance ~0.1 give a
    # standard error about 0.1 / sqrt(20000) per point; 0.05 nats is the bound
    assert (estimate - exact).abs().max() < 0.05
    assert (estimate - exact).abs().mean() < 0.01
    # the ELBO falls short of log p(x) by KL(q || posterior), the same for every point
    # here (q and the posterior share their mean; q's covariance is fixed): exactly
    q_cov = torch.diag(1.69 * lg.post_cov.diagonal())
    gap = 0.5 * (
        torch.trace(torch.linalg.solve(lg.post_cov, q_cov))
        - 2
        + torch.logdet(lg.post_cov)
        - torch.logdet(q_cov)
    )
    terms = pyro_vae.elbo_terms(lg, x, kl="analytic", num_samples=400)
    assert torch.allclose(terms.elbo, terms.expected_log_likelihood - terms.kl)
    shortfall = exact - terms.elbo
    # the expected log-likelihood is a 400-draw average: 4 standard errors of the mean
    standard_error = shortfall.std() / math.sqrt(len(shortfall))
    assert abs(float(shortfall.mean() - gap)) < 4 * float(standard_error) + 1e-3


def test_tutorial_vae_trains_with_fit_and_the_graph_equals_the_eager_elbo(digits):
    histories, states = [], []
    for compile_ in (True, False):
        torch.manual_seed(0)
        vae = TutorialVAE()
        before = {k: v.clone() for k, v in vae.state_dict().items()}
        history = pyro_vae.fit(vae, digits, tiny_config(compile=compile_), progress=False, log=None)
        histories.append(history)
        states.append(vae.state_dict())
        assert any(not torch.equal(before[k], v) for k, v in vae.state_dict().items())
        if compile_:  # the steps replayed a graph captured from the user's program
            assert any(g is not None for g in GraphCache.of(vae).graphs.values())
    assert histories[0]["test_elbo"] == histories[1]["test_elbo"]
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], rtol=0, atol=0)
    assert histories[0]["test_elbo"][-1] > histories[0]["test_elbo"][0]
    # fit used a private param store: nothing of the model leaked into Pyro's global one
    assert "decoder$$$fc1.weight" not in pyro.get_param_store()


def test_fit_scales_the_mini_batch_bound_to_the_data_set(digits):
    """The reported training ELBO is the mini-batch bound scaled by num_data / batch:
    per data point it must match the model's ELBO on the data, not batch/num_data of it."""
    torch.manual_seed(0)
    vae = TutorialVAE()
    history = pyro_vae.fit(vae, digits, tiny_config(epochs=1, lr=1e-6), progress=False, log=None)
    with torch.no_grad():
        train = pyro_vae.evaluate_elbo(vae, digits.train.images, num_samples=4)["elbo"]
    # lr 1e-6: the parameters barely move, so the epoch's mean bound is the ELBO of the
    # training set up to Monte Carlo noise (dynamic vs static binarization aside: static)
    assert abs(history["train_elbo"][0] - train) < 1.0


def test_every_analysis_takes_the_tutorial_vae(digits):
    torch.manual_seed(0)
    vae = TutorialVAE()
    pyro_vae.fit(vae, digits, tiny_config(epochs=1), progress=False, log=None)
    x = digits.test.images[:40]
    terms = pyro_vae.elbo_terms(vae, x, kl="analytic")
    assert set(terms.kl_by_site) == {"latent"}
    log_px = pyro_vae.log_likelihood(vae, x, num_samples=500)
    assert log_px.mean() > terms.elbo.mean()
    result = pyro_vae.evaluate(vae, x, num_samples=100, elbo_samples=2)
    assert math.isfinite(result.test_log_likelihood) and result.active_units >= 0
    assert result.test_log_likelihood > result.test_elbo
    bounds = pyro_vae.bound_tightness(vae, x, particles=(1, 10), num_samples=500)
    assert bounds["bound_means"][0] < bounds["bound_means"][1] < bounds["log_likelihood"] + 0.05
    stats = pyro_vae.estimator_gradient_statistics(vae, x[:10], "mc", 1, num_draws=8)
    assert set(stats) == {"encoder", "decoder"}
    assert stats["encoder"]["variance"] > 0 and stats["decoder"]["variance"] > 0
    assert stats["encoder"]["parameters"] == sum(p.numel() for p in vae.encoder.parameters())


def test_gradient_statistics_read_the_model_object_never_the_global_param_store():
    """Two tutorial VAEs with the same pyro.module names in one process: the second's
    statistics must be its own (the param store held the first one's tensors)."""
    x = torch.rand(10, 64).bernoulli()
    torch.manual_seed(1)
    second = TutorialVAE()
    pyro.set_rng_seed(5)
    alone = pyro_vae.estimator_gradient_statistics(second, x, "mc", 1, num_draws=6)
    torch.manual_seed(0)
    first = TutorialVAE()
    pyro.clear_param_store()
    first.model(x)  # the tutorial's SVI would leave first's tensors under these names
    first.guide(x)
    pyro.set_rng_seed(5)
    after = pyro_vae.estimator_gradient_statistics(second, x, "mc", 1, num_draws=6)
    assert after == alone and after["decoder"]["variance"] > 0


def test_diagnostics_take_the_tutorial_vae():
    from pyro_vae.analysis.diagnostics import guide_draws, inference_gaps, nuts_posterior

    torch.manual_seed(0)
    vae = TutorialVAE(z_dim=2)
    x = torch.rand(2, 64).bernoulli()
    idata = nuts_posterior(vae, x, chains=1, warmup=20, samples=20, jit=False)
    assert list(idata.posterior.data_vars) == ["latent"]
    assert idata.posterior["latent"].shape == (1, 20, 2, 2)
    draws = guide_draws(vae, x, chains=1, samples=20)
    assert draws.posterior["latent"].shape == (1, 20, 2, 2)
    gaps = inference_gaps(vae, x, is_samples=200, local_steps=30)
    per = gaps["per_image"]
    assert len(per["approximation_gap"]) == 2
    # the local guide starts from the encoder's q and only climbs its own ELBO
    assert all(
        local >= amortized - 0.5
        for local, amortized in zip(per["optimal_local_elbo"], per["amortized_elbo"])
    )


def test_fit_refuses_an_object_that_is_not_a_module(digits):
    with pytest.raises(ModelError, match="torch.nn.Module"):
        pyro_vae.fit(LinearGaussian(data_dim=64), digits, tiny_config(), progress=False, log=None)


def test_diagnose_model_leaves_out_the_image_grid_of_a_model_without_data_shape(tmp_path):
    # Pyro's tutorial VAE says nothing of its data's shape: the whole diagnosis runs,
    # and only the grid of worst images (which needs the shape) is left out
    from pyro_vae.analysis.diagnostics import diagnose_model
    from pyro_vae.app.diagnose_report import write_plots

    torch.manual_seed(0)
    vae, test = TutorialVAE(z_dim=2), torch.rand(6, 64).bernoulli()
    diagnosis = diagnose_model(
        vae,
        test,
        [0, 1],
        chains=1,
        warmup=10,
        samples=10,
        is_samples=20,
        local_steps=5,
        khat_images=6,
        khat_samples=50,
        jit=False,
        progress=False,
        log=None,
    )
    assert diagnosis.worst_images is None and len(diagnosis.khat_values) == 6
    names = {path.name for path in write_plots(tmp_path, diagnosis)}
    assert "khat.png" in names and "worst_khat_images.png" not in names


class BatchNormVAE(TutorialVAE):
    """The tutorial VAE with a BatchNorm1d in its decoder: it takes (batch, z_dim) only."""

    def __init__(self, z_dim: int = 4, hidden_dim: int = 32):
        super().__init__(z_dim, hidden_dim)
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.Softplus(),
            nn.Linear(hidden_dim, 64),
            nn.Sigmoid(),
        )


def test_a_batchnorm_network_trains_and_is_evaluated_with_the_shapes_it_takes(digits):
    # one particle: training and the per-epoch evaluation pass (batch, z_dim), as Pyro's
    # Trace_ELBO does; several samples of z: one line naming the model, the shape and the fix
    torch.manual_seed(0)
    vae = BatchNormVAE()
    history = pyro_vae.fit(vae, digits, tiny_config(epochs=1), progress=False, log=None)
    assert math.isfinite(history.last["test_elbo"])
    with pytest.raises(UserInputError) as caught:
        pyro_vae.log_likelihood(vae, digits.evaluation_images("test")[:20], num_samples=10)
    message = str(caught.value)
    assert "\n" not in message and "BatchNormVAE" in message
    assert re.search(r"inputs of shape \(10, \d+, \.\.\.\)", message)
    assert "leading sample dimensions" in message


def test_a_false_claim_that_the_closed_form_kl_is_exact_is_refused():
    # a bottom-up guide draws z2 from z1, while z1's prior depends on z2: its closed-form
    # KL is biased whatever the model declares
    from pyro_vae.models.hierarchical import HierarchicalVAE

    config = pyro_vae.ModelConfig(latent_dims=(3, 2), hidden=(8,), guide="bottom-up")
    vae = pyro_vae.build_vae(config, (10,))
    assert isinstance(vae, HierarchicalVAE)

    class Claims(type(vae)):
        analytic_kl_is_exact = True

    vae.__class__ = Claims
    x = torch.bernoulli(torch.full((4, 10), 0.5))
    with pytest.raises(
        ModelError, match="declares analytic_kl_is_exact = True, but the prior of 'z1'"
    ):
        pyro_vae.elbo_terms(vae, x, kl="analytic")
    top_down = pyro_vae.build_vae(
        pyro_vae.ModelConfig(latent_dims=(3, 2), hidden=(8,), guide="top-down"), (10,)
    )
    assert math.isfinite(float(pyro_vae.elbo_terms(top_down, x, kl="analytic").elbo.sum().detach()))


def test_a_data_plate_without_a_size_is_refused_alike_by_every_tool():
    # one check of the protocol, made by the ELBO's terms under either KL, the gradient
    # statistics and NUTS alike (it once held for the closed-form KL and fit only)
    from pyro_vae.analysis.diagnostics import nuts_posterior
    from pyro_vae.analysis.gradients import estimator_gradient_statistics

    class Unsized(TutorialVAE):
        def model(self, x):
            pyro.module("decoder", self.decoder)
            with pyro.plate("data", dim=-1):
                z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
                pyro.sample(
                    "obs", dist.Bernoulli(self.decoder(z), validate_args=False).to_event(1), obs=x
                )

        def guide(self, x):
            pyro.module("encoder", self.encoder)
            with pyro.plate("data", dim=-1):
                pyro.sample("latent", dist.Normal(*self.encoder(x)).to_event(1))

    vae, x = Unsized(z_dim=2), torch.rand(4, 64).bernoulli()
    calls = {
        "elbo_terms mc": lambda: pyro_vae.elbo_terms(vae, x, kl="mc"),
        "elbo_terms analytic": lambda: pyro_vae.elbo_terms(vae, x, kl="analytic"),
        "gradients": lambda: estimator_gradient_statistics(vae, x, "mc", 1, 3),
        "nuts": lambda: nuts_posterior(vae, x, chains=1, warmup=2, samples=2, jit=False),
    }
    for name, call in calls.items():
        with pytest.raises(ModelError, match="not inside a plate over the data points"):
            call()
            pytest.fail(f"{name} accepted a data plate without a size")
