"""evaluate: active units, PSIS k-hat, and the report of a trained model."""

from __future__ import annotations

import pytest
import torch

from pyro_vae import ModelConfig, TrainConfig, build_vae, load_data
from pyro_vae.evaluation import active_units, evaluate, log_likelihood_and_khat, psis_khat
from pyro_vae.exact import LinearGaussianVAE
from pyro_vae.training import fit


def test_active_units_count_the_dimensions_the_encoder_uses():
    vae = LinearGaussianVAE.random(6, 4, noise_scale=0.5, seed=0)
    with torch.no_grad():
        vae.encoder.loc.weight[1:3] = 0.0  # two units ignore x: their mean never varies
    x = vae.marginal().sample((500,)).float()
    result = active_units(vae, x)
    assert result["active_units"] == 2 and result["latent_dims"] == 4
    assert result["by_site"]["z"]["variance"][1] < 1e-12


def test_khat_is_small_for_a_good_guide_and_large_for_a_narrow_one():
    vae = LinearGaussianVAE.random(6, 2, noise_scale=0.5, seed=0, orthogonal=True)
    x = vae.marginal().sample((20,)).float()
    vae.set_guide_to_posterior()
    with torch.no_grad():
        vae.encoder.loc.bias += 0.05  # near, not at, the posterior: weights vary a little
    _, good = log_likelihood_and_khat(vae, x, num_samples=2000)
    with torch.no_grad():
        vae.encoder.raw_scale -= 3.0  # scale shrinks to ~5%: heavy-tailed weights
    _, bad = log_likelihood_and_khat(vae, x, num_samples=2000)
    assert good.max() < 0.5, good
    assert (bad > 0.7).mean() > 0.8, bad


def test_psis_takes_log_ratios_with_samples_first():
    torch.manual_seed(0)
    log_w = torch.randn(1000, 3, dtype=torch.float64) * 0.1  # nearly constant weights
    assert psis_khat(log_w).shape == (3,)
    assert (psis_khat(log_w) < 0.5).all()


def test_evaluate_reports_consistent_numbers():
    data = load_data("digits", limit=200)
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(latent_dims=(4,), hidden=(32,)), data.data_shape)
    fit(vae, data, TrainConfig(epochs=3, batch_size=50), log=None)
    result = evaluate(vae, data.evaluation_images()[:50], num_samples=200)
    assert result["test_nll"] == pytest.approx(-result["test_log_likelihood"])
    assert result["kl"] == result["test_kl"] > 0
    assert result["test_elbo"] == pytest.approx(
        result["test_expected_log_likelihood"] - result["test_kl"]
    )
    assert result["test_log_likelihood"] > result["test_elbo"]  # L_200 above L_1
    assert 0 <= result["active_units"] <= 4
    assert 0 <= result["khat_share_above_0.7"] <= 1


def test_active_units_average_conditional_means_over_parent_draws():
    from pyro_vae.exact import TwoLayerLinearGaussianVAE

    # bottom-up guide whose z1 ignores x: E_q[z2 | x] is the same for every image, so z2
    # has no active unit, though q(z2 | z1)'s mean at one draw of z1 varies a lot
    vae = TwoLayerLinearGaussianVAE.random(5, (3, 2), (0.6, 0.8), "bottom-up", seed=4)
    with torch.no_grad():
        vae.inference.q1.weight.zero_()
        vae.inference.raw_scale1.fill_(0.5)  # q(z1) with sd ~1: noisy single draws
        vae.inference.q2_from_z1.weight.fill_(1.0)
    x = vae.marginal().sample((400,)).float()
    one_draw = active_units(vae, x, parent_draws=1)["by_site"]["z2"]["active"]
    # averaged over 4096 draws the noise variance is ~3 / 4096 < 0.001
    averaged = active_units(vae, x, parent_draws=4096)["by_site"]["z2"]
    assert one_draw == 2  # the single-draw noise alone exceeds the 0.01 threshold
    assert averaged["active"] == 0 and max(averaged["variance"]) < 0.01
