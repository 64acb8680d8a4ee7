"""AIS and BDMC against exact answers: linear-Gaussian models (one and two layers,
float64) whose log p(x) is known in closed form, and a user's own model.

Tolerances: AIS is checked per point against its own standard error over the chains
(delta method); means over many independent runs against the standard error of the
mean over the runs. Seeds are fixed, so each check is one draw that a wrong estimator
(a sign error in the weights, a transition that does not leave f_t invariant, a
reverse chain that is not the forward chain reversed) misses by many standard errors.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import pyro_vae
from pyro_vae.analysis.ais import annealing_schedule, simulate
from pyro_vae.analysis.evaluation import log_likelihood
from pyro_vae.errors import UserInputError
from pyro_vae.models.exact import LinearGaussianVAE, TwoLayerLinearGaussianVAE, _inverse_softplus
from pyro_vae.objectives.terms import log_importance_weights

from .helpers import TINY_RUN, run_cli
from .test_own_model import LinearGaussian, TutorialVAE


def one_layer(seed: int = 3, noise_scale: float = 1.0) -> LinearGaussianVAE:
    return LinearGaussianVAE.random(5, 2, noise_scale=noise_scale, seed=seed).double()


def exact(vae, x: torch.Tensor) -> torch.Tensor:
    return vae.log_marginal(x).detach()


def test_schedules_run_from_zero_to_one_and_increase():
    for schedule in ("sigmoid", "linear"):
        betas = annealing_schedule(50, schedule)
        assert betas[0] == 0 and betas[-1] == 1 and len(betas) == 51
        assert bool((betas.diff() > 0).all())
    sigmoid = annealing_schedule(50, "sigmoid").diff()
    assert sigmoid[0] < sigmoid[25] and sigmoid[-1] < sigmoid[25]  # finer at both ends
    assert torch.equal(annealing_schedule(1), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_one_step_is_importance_sampling_from_the_guide():
    """T = 1: no transition, the weights are p(x, z) / q(z|x) of C guide draws, the
    same draws as log_importance_weights' for the same seed."""
    vae = one_layer()
    x = vae.marginal().sample((6,))
    torch.manual_seed(5)
    log_w = log_importance_weights(vae, x, 7).detach().double()
    expected = torch.logsumexp(log_w, 0) - math.log(7)
    torch.manual_seed(5)
    result = pyro_vae.ais_log_likelihood(vae, x, steps=1, chains=7, adaptation_chains=0)
    assert torch.allclose(result.log_likelihood, expected, rtol=0, atol=1e-10)
    assert result.log_likelihood.dtype == torch.float64 and result.evaluations == 1


def test_the_exact_posterior_as_guide_gives_log_px_exactly():
    """With q = p(z|x) every f_t is the posterior and every weight is p(x): forward and
    reverse AIS return log p(x) to rounding, whatever the transitions do."""
    vae = LinearGaussianVAE.random(6, 3, noise_scale=0.5, seed=1, orthogonal=True).double()
    vae.set_guide_to_posterior()
    x = vae.marginal().sample((5,))
    result = pyro_vae.ais_log_likelihood(vae, x, steps=10, chains=4)
    assert torch.allclose(result.log_likelihood, exact(vae, x), rtol=0, atol=1e-6)
    assert float(result.standard_error.max()) < 1e-6
    assert 0.5 < float(result.acceptance_rate.mean()) <= 1  # the chains did move
    both = pyro_vae.bdmc(vae, x, steps=10, chains=4)
    assert torch.allclose(both.lower, exact(vae, both.data), rtol=0, atol=1e-6)
    assert torch.allclose(both.upper, exact(vae, both.data), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers, steps", [(1, 200), (2, 100)])
def test_ais_reaches_the_exact_log_px_as_steps_grow(layers, steps):
    """A random (poor) guide, 6 points: at T = 10 the standard error is large; at T = 200
    (100 for two layers) it is several times smaller and each point is within 4 of its
    standard errors of the exact value (the delta-method standard error; at this T the
    bias of the log of the mean, about var / 2C, is far below it)."""
    if layers == 1:
        vae = one_layer()
    else:  # bottom-up guide: both latent sites annealed jointly
        vae = TwoLayerLinearGaussianVAE.random(
            5, (2, 2), noise_scales=(0.7, 0.7), guide_order="bottom-up", seed=2
        ).double()
    torch.manual_seed(0)
    x = vae.marginal().sample((6,))
    truth = exact(vae, x)
    short = pyro_vae.ais_log_likelihood(vae, x, steps=10, chains=16)
    long = pyro_vae.ais_log_likelihood(vae, x, steps=steps, chains=16)
    error = (long.log_likelihood - truth).abs()
    assert bool((error <= 4 * long.standard_error).all()), (error, long.standard_error)
    assert float(long.standard_error.mean()) < float(short.standard_error.mean()) / 2
    assert float(error.mean()) < 0.2
    assert 0.5 < float(long.acceptance_rate.mean()) < 0.85  # adapted toward 0.65


def test_bdmc_brackets_the_exact_log_px():
    """On simulated data the forward bound sits below and the reverse bound above the
    exact log p(x) of each simulated point (within 3 standard errors over the chains),
    and the gap is small at T = 100: within the chains' noise of 0."""
    vae = one_layer()
    x = torch.zeros(6, 5, dtype=torch.float64)  # only the shape is used
    torch.manual_seed(1)
    result = pyro_vae.bdmc(vae, x, steps=100, chains=8)
    truth = exact(vae, result.data)
    assert result.data.shape == x.shape and not torch.equal(result.data, x)
    assert bool((result.lower <= truth + 3 * result.forward.standard_error).all())
    assert bool((result.upper >= truth - 3 * result.reverse.standard_error).all())
    assert torch.equal(result.gap, result.upper - result.lower)
    # the gap's expectation is >= 0; at T = 100 it is below the chains' noise
    noise = (result.forward.standard_error**2 + result.reverse.standard_error**2).sum().sqrt()
    assert -3 * float(noise) / 6 < float(result.gap.mean()) < 0.5
    # the reverse chains used the forward run's step sizes
    assert torch.equal(result.reverse.step_sizes, result.forward.step_sizes)


def test_expectation_is_a_lower_bound_and_the_reverse_one_an_upper_bound():
    """Averaged over 300 independent short runs (T = 5, one chain: a loose bound) the
    forward estimate lies below log p(x), the reverse one above, each by many standard
    errors of the mean over the runs."""
    vae = one_layer()
    runs = 300
    torch.manual_seed(2)
    point = vae.marginal().sample((1,))
    forward = pyro_vae.ais_log_likelihood(vae, point.expand(runs, 5), steps=5, chains=1)
    below = exact(vae, point) - forward.log_likelihood
    assert float(below.mean()) > 5 * float(below.std()) / math.sqrt(runs)
    both = pyro_vae.bdmc(vae, point.expand(runs, 5), steps=5, chains=1)
    above = both.upper - exact(vae, both.data)
    assert float(above.mean()) > 5 * float(above.std()) / math.sqrt(runs)
    assert float(both.forward.standard_error.isnan().all())  # one chain: no spread


def test_ais_beats_importance_sampling_from_a_poor_guide_at_equal_cost():
    """A guide 20 times narrower than the posterior and shifted by one unit (KL 7.7 nats):
    IS with three forward passes per gradient evaluation of AIS (adaptation chains
    counted) stays about 6 nats below log p(x); AIS with 4 chains and T = 20 gets much
    closer. 16 points: the mean difference is far above its standard error (~0.5)."""
    vae = LinearGaussianVAE.random(5, 2, noise_scale=0.5, seed=1, orthogonal=True).double()
    vae.set_guide_to_posterior()
    with torch.no_grad():
        vae.encoder.loc.bias += 1.0
        vae.encoder.raw_scale.copy_(_inverse_softplus(torch.full((2,), 0.05).double()))
    torch.manual_seed(0)
    x = vae.marginal().sample((16,))
    truth = exact(vae, x)
    ais = pyro_vae.ais_log_likelihood(vae, x, steps=20, chains=4, leapfrog=4)
    samples = 3 * (ais.chains + ais.adaptation_chains) * ais.evaluations
    importance = log_likelihood(vae, x, samples)
    assert float((truth - importance).mean()) > 4
    assert float((ais.log_likelihood - importance).mean()) > 2


def test_a_users_own_models():
    """The tutorial's Bernoulli VAE (sites 'latent' and 'obs', a flattening of its own) and
    a plain object with model and guide (float32): AIS, prior start and BDMC run; on the
    linear one AIS matches the exact log p(x)."""
    torch.manual_seed(0)
    tutorial = TutorialVAE()
    images = torch.rand(4, 8, 8).bernoulli()
    result = pyro_vae.ais_log_likelihood(tutorial, images, steps=20, chains=4, start="prior")
    assert result.log_likelihood.shape == (4,) and bool(result.log_likelihood.lt(0).all())
    data, latents = simulate(tutorial, images)
    assert data.shape == images.shape and set(latents) == {"latent"}
    assert set(data.unique().tolist()) <= {0.0, 1.0}
    both = pyro_vae.bdmc(tutorial, images, steps=10, chains=2)
    assert both.gap.shape == (4,) and bool(torch.isfinite(both.gap).all())
    linear = LinearGaussian()
    x = linear.sample(4, torch.Generator().manual_seed(0))
    result = pyro_vae.ais_log_likelihood(linear, x, steps=50, chains=8)
    error = (result.log_likelihood - linear.exact_log_marginal(x).double()).abs()
    assert bool((error < 4 * result.standard_error + 1e-3).all())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"chains": 0}, "chains must be an integer >= 1"),
        ({"leapfrog": 0}, "leapfrog must be an integer >= 1"),
        ({"start": "posterior"}, "start must be one of guide, prior"),
        ({"schedule": "cosine"}, "schedule must be one of sigmoid, linear"),
        ({"step_size": 0.0}, "step_size must be > 0"),
        ({"adaptation_chains": -1}, "adaptation_chains must be an integer >= 0"),
        ({"target_acceptance": 1.0}, "target_acceptance must be in (0, 1)"),
    ],
)
def test_bad_options_are_refused_in_one_line(options, message):
    vae = one_layer()
    for function in (pyro_vae.ais_log_likelihood, pyro_vae.bdmc):
        with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            function(vae, torch.zeros(2, 5, dtype=torch.float64), **options)


# ------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from pyro_vae.app.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["train", *TINY_RUN, "--epochs", "1", "--eval-samples", "0", "--out", str(out)]
    assert main(argv) == 0
    return str(out)


def test_evaluate_prints_is_ais_and_the_bdmc_gap_side_by_side(tiny_run, capsys):
    argv = ["evaluate", tiny_run, "--samples", "50", "--images", "6", "--ais-steps", "10"]
    code, out, _ = run_cli([*argv, "--ais-chains", "3", "--bdmc", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["points"] == 6 and result["ais_points"] == 6 and result["bdmc_points"] == 6
    assert result["ais_steps"] == 10 and result["ais_chains"] == 3 and result["ais_leapfrog"] == 5
    for key in ("ais_log_likelihood", "ais_log_likelihood_sem", "ais_chain_standard_error"):
        assert math.isfinite(result[key]), key
    assert 0 < result["ais_acceptance_rate"] <= 1
    assert result["bdmc_gap"] == pytest.approx(result["bdmc_upper"] - result["bdmc_lower"])
    # the same seed: the printed numbers are the JSON's
    code, out, _ = run_cli([*argv, "--ais-chains", "3", "--bdmc", "--quiet"], capsys)
    assert code == 0
    assert "IS    K=50" in out and "AIS   T=10, C=3, L=5 (guide)" in out and "BDMC  gap" in out
    assert f"{result['ais_log_likelihood']:9.3f} ± {result['ais_log_likelihood_sem']:.3f}" in out
    assert f"{result['bdmc_gap']:9.3f}" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--bdmc"], "--bdmc brackets AIS: give the number of steps with --ais-steps T"),
        (["--ais-steps", "0"], "--ais-steps must be >= 1, got 0"),
        (["--ais-steps", "5", "--ais-chains", "0"], "--ais-chains must be >= 1, got 0"),
        (["--ais-steps", "5", "--ais-leapfrog", "0"], "--ais-leapfrog must be >= 1, got 0"),
        (["--images", "0"], "--images must be >= 1, got 0"),
    ],
)
def test_bad_ais_flags_are_refused_in_one_line(tiny_run, flags, message, capsys):
    code, out, err = run_cli(["evaluate", tiny_run, *flags], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_compare_shows_the_ais_column_beside_is_and_refuses_a_bad_t(tmp_path, capsys):
    from pyro_vae.app.compare_report import markdown_table

    fields = ["test_elbo", "test_log_likelihood", "ais_log_likelihood"]
    fields += ["objective_minus_log_likelihood", "encoder_snr", "decoder_snr"]
    fields += ["encoder_variance", "decoder_variance", "active_units", "informative_units"]
    fields += ["seconds_per_epoch", "cpu_seconds_per_epoch"]
    row: dict = {"estimator": "mc", "repeats": 2}
    for field in fields:
        row |= {field: -48.0, f"{field}_std": 0.0, f"{field}_ci": 0.0}
    # (± is the 95% t-interval's half-width, `_ci`, since issue 25; no longer the std)
    row |= {"ais_log_likelihood": -47.25, "ais_log_likelihood_std": 0.1}
    row |= {"ais_log_likelihood_ci": 0.5}
    header, rule, line = markdown_table([row], 20, ais_steps=7).splitlines()
    assert "| test log p(x), K=20 | AIS log p(x), T=7 |" in header
    assert "| -48.00 ± 0.00 | -47.25 ± 0.50 |" in line
    assert header.count("|") == rule.count("|") == line.count("|")
    assert "AIS" not in markdown_table([row], 20)
    out = tmp_path / "compare"
    code, _, err = run_cli(["compare", "--ais-steps", "0", "--out", out, "--quiet"], capsys)
    assert code == 2 and "--ais-steps must be >= 1, got 0" in err
