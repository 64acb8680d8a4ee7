"""The field's baselines against exact answers: score, tracegraph, vimco, rws, miwae,
ciwae and piwae on the linear-Gaussian models, whose log p(x) and ELBO (and so the
ELBO's gradient) are known in closed form.

Two kinds of check:

- identities, same noise on both sides (the same seed): vimco's and rws's value is
  iwae's; ciwae(beta=1) is mc and ciwae(beta=0) iwae; miwae(M=1) is iwae; rws's and
  piwae's decoder gradients are iwae's; piwae's encoder gradient is miwae's. These hold
  to float32 rounding.
- statistics, fixed seeds: a score-function gradient is unbiased for the exact (or
  the reparameterized, many-draw) gradient. Each coordinate's mean over R independent
  steps is compared with the reference in standard errors; with C coordinates a
  Bonferroni bound puts the chance that any |z| exceeds Z_MAX = 4.5 at most
  C * 2 * (1 - Phi(4.5)) = C * 6.8e-6 (below 3e-4 here). Heavy tails would make the
  normal approximation optimistic: R is some hundreds of steps of K draws each.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

import pyro_vae as pv
from pyro_vae import make_elbo
from pyro_vae.models.exact import LinearGaussianVAE

#: |z| above this in any coordinate fails (see the module's docstring)
Z_MAX = 4.5
#: float32 rounding between two computations of the same sums
RTOL = 2e-5


def _exact_model() -> tuple[LinearGaussianVAE, torch.Tensor]:
    model = LinearGaussianVAE.random(data_dim=4, latent_dim=2, noise_scale=0.8, seed=3)
    torch.manual_seed(0)
    return model, model.marginal().sample((6,)).float()


def _flat(model, which=None) -> torch.Tensor:
    """The gradient of ``model``'s parameters (of the submodule ``which``) as one vector."""
    module = model if which is None else getattr(model, which)
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in module.parameters()
        ]
    ).double()


def _step(elbo, model, x, scale=None):
    program, guide = model.model, model.guide
    if scale is not None:
        program, guide = poutine.scale(program, scale=scale), poutine.scale(guide, scale=scale)
    model.zero_grad(set_to_none=True)
    return elbo.loss_and_grads(program, guide, x)


def _once(name, num_particles, model, x, seed=5, scale=None, **options):
    """Loss, encoder gradient and decoder gradient of one step with the noise of ``seed``."""
    elbo = make_elbo(name, num_particles, options=options)
    pyro.set_rng_seed(seed)
    with pyro.get_param_store().scope():
        loss = _step(elbo, model, x, scale)
    return torch.tensor(loss, dtype=torch.float64), _flat(model, "encoder"), _flat(model, "decoder")


def _close(actual, expected, what):
    bound = RTOL * expected.abs().max().clamp_min(1e-3)
    error = (actual - expected).abs().max()
    assert error <= bound, f"{what}: off by {error:.3g}"


def _draws(name, num_particles, model, x, repeats, seed, **options):
    """``repeats`` gradients (all parameters) of independent steps, one ELBO object and
    one param store for all (so that a baseline with state learns along)."""
    elbo = make_elbo(name, num_particles, options=options)
    pyro.set_rng_seed(seed)
    grads, values = [], []
    with pyro.get_param_store().scope():
        for _ in range(repeats):
            values.append(-_step(elbo, model, x))
            grads.append(_flat(model))
    return torch.tensor(values, dtype=torch.float64), torch.stack(grads)


def _z_scores(draws, reference, reference_draws=None):
    """Per coordinate, the mean of ``draws`` minus ``reference`` in standard errors (of
    both sides when the reference is itself a mean of draws)."""
    variance = draws.var(0) / len(draws)
    if reference_draws is not None:
        reference = reference_draws.mean(0)
        variance = variance + reference_draws.var(0) / len(reference_draws)
    return (draws.mean(0) - reference) / variance.sqrt().clamp_min(1e-12)


def _exact_elbo_gradient(model, x) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    (-model.exact_elbo(x).sum()).backward()
    return _flat(model)


# ------------------------------------------------------------------ identities
@pytest.mark.parametrize("num_particles", [1, 4])
def test_vimco_and_rws_report_the_iwae_bound_of_the_same_draws(num_particles):
    model, x = _exact_model()
    iwae, _, _ = _once("iwae", num_particles, model, x, scale=20.0)
    for name in ("vimco", "rws"):
        value, _, _ = _once(name, num_particles, model, x, scale=20.0)
        _close(value, iwae, f"{name}'s value against iwae's")


def test_ciwae_is_mc_at_beta_one_and_iwae_at_beta_zero():
    model, x = _exact_model()
    for beta, other in ((1.0, "mc"), (0.0, "iwae")):
        ours = _once("ciwae", 4, model, x, scale=7.0, beta=beta)
        theirs = _once(other, 4, model, x, scale=7.0)
        for a, b, what in zip(ours, theirs, ("value", "encoder gradient", "decoder gradient")):
            _close(a, b, f"ciwae(beta={beta}) {what} against {other}")


def test_miwae_with_one_outer_bound_is_iwae():
    model, x = _exact_model()
    ours, theirs = _once("miwae", 5, model, x, outer=1), _once("iwae", 5, model, x)
    for a, b, what in zip(ours, theirs, ("value", "encoder gradient", "decoder gradient")):
        _close(a, b, f"miwae(M=1) {what} against iwae")


def test_rws_decoder_gradient_is_the_iwae_decoder_gradient():
    model, x = _exact_model()
    _, _, rws = _once("rws", 5, model, x, scale=3.0)
    _, _, iwae = _once("iwae", 5, model, x, scale=3.0)
    _close(rws, iwae, "rws's decoder gradient against iwae's")


def test_piwae_is_iwae_for_the_decoder_and_miwae_for_the_encoder():
    # PIWAE(M=3, K=2) draws 6 per data point: iwae with 6 particles, same noise
    model, x = _exact_model()
    value, encoder, decoder = _once("piwae", 2, model, x, scale=4.0, outer=3)
    iwae_value, _, iwae_decoder = _once("iwae", 6, model, x, scale=4.0)
    _, miwae_encoder, _ = _once("miwae", 2, model, x, scale=4.0, outer=3)
    _close(value, iwae_value, "piwae's value against iwae's L_MK")
    _close(decoder, iwae_decoder, "piwae's decoder gradient against iwae's (M * K)")
    _close(encoder, miwae_encoder, "piwae's encoder gradient against miwae's")


def test_the_score_function_estimators_accept_a_guide_without_rsample():
    # the estimator treats the sites as not reparameterized itself: a guide whose
    # distribution has no rsample trains as it is (the reparameterized ones refuse it)
    class NoRsample(pyro.distributions.Normal):
        has_rsample = False

    model, x = _exact_model()

    def guide(x):
        pyro.module("encoder", model.encoder)
        loc, scale = model.encode(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", NoRsample(loc, scale).to_event(1))

    for name in ("score", "tracegraph", "vimco", "rws"):
        elbo = make_elbo(name, 3)
        pyro.set_rng_seed(0)
        with pyro.get_param_store().scope():
            model.zero_grad(set_to_none=True)
            loss = elbo.loss_and_grads(model.model, guide, x)
        assert math.isfinite(loss) and _flat(model, "encoder").abs().sum() > 0, name


# ------------------------------------------------------------------ statistics
#: Pyro's TraceGraph_ELBO takes some 50 ms a step here: its other baselines are slow tests
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "name,options",
    [
        ("score", {}),
        ("score", {"baseline": "leave-one-out"}),
        ("tracegraph", {}),
        pytest.param("tracegraph", {"baseline": "none"}, marks=_SLOW),
        pytest.param("tracegraph", {"baseline": "learned", "baseline_lr": 0.01}, marks=_SLOW),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={o}" for k, o in v.items()),
)
def test_score_function_gradient_is_unbiased_for_the_exact_elbo_gradient(name, options):
    # E[gradient] = the exact ELBO's gradient, for any baseline independent of the draw
    # (the decaying average and the learned baseline learn along: one param store, one
    # estimator for all steps). 150 steps of 8 draws; the value's mean is the exact ELBO
    model, x = _exact_model()
    values, draws = _draws(name, 8, model, x, repeats=150, seed=1, **options)
    z = _z_scores(draws, _exact_elbo_gradient(model, x))
    assert z.abs().max() < Z_MAX, f"{name} {options}: gradient z-scores {z.tolist()}"
    exact = float(model.exact_elbo(x).sum().detach())
    z_value = (values.mean() - exact) / (values.std() / math.sqrt(len(values)))
    assert abs(z_value) < Z_MAX, f"{name}: value {values.mean():.4f} against {exact:.4f}"


def test_vimco_gradient_is_unbiased_for_the_iwae_bound_gradient():
    # E[vimco's gradient] = grad L_K, which the reparameterized iwae gradient also
    # estimates without bias: a two-sample test per coordinate, K = 4
    model, x = _exact_model()
    _, vimco = _draws("vimco", 4, model, x, repeats=300, seed=2)
    _, iwae = _draws("iwae", 4, model, x, repeats=150, seed=3)
    z = _z_scores(vimco, None, iwae)
    assert z.abs().max() < Z_MAX, f"vimco: gradient z-scores {z.tolist()}"


def test_the_bounds_lie_between_the_elbo_and_log_p_x():
    # in expectation: ELBO <= MIWAE(2, 3), CIWAE, L_K (vimco, rws, piwae) <= log p(x)
    model, x = _exact_model()
    with torch.no_grad():
        elbo, log_p = float(model.exact_elbo(x).sum()), float(model.log_marginal(x).sum())
    for name, options in [
        ("miwae", {"outer": 2}),
        ("ciwae", {}),
        ("vimco", {}),
        ("rws", {}),
        ("piwae", {"outer": 2}),
    ]:
        elbo_object = make_elbo(name, 3, options=options)
        pyro.set_rng_seed(4)
        with torch.no_grad(), pyro.get_param_store().scope():
            values = torch.tensor(
                [-elbo_object.loss(model.model, model.guide, x) for _ in range(100)],
                dtype=torch.float64,
            )
        error = Z_MAX * float(values.std()) / math.sqrt(len(values))
        mean = float(values.mean())
        assert elbo - error <= mean <= log_p + error, (name, elbo, mean, log_p)


def test_score_gradient_varies_more_than_the_reparameterized_one():
    # the reason reparameterization matters: the encoder's gradient variance under the
    # score function exceeds mc's, same model, same draws per step (one)
    model, x = _exact_model()
    encoder = sum(p.numel() for p in model.encoder.parameters())
    _, score = _draws("score", 1, model, x, repeats=200, seed=6)
    _, mc = _draws("mc", 1, model, x, repeats=200, seed=6)
    score_var, mc_var = score[:, :encoder].var(0).sum(), mc[:, :encoder].var(0).sum()
    assert score_var > 5 * mc_var, (float(score_var), float(mc_var))


# ------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def digits():
    return pv.DataConfig(dataset="digits", limit=200).load(seed=0)


@pytest.mark.parametrize("name", ["score", "tracegraph", "vimco", "rws", "miwae", "ciwae", "piwae"])
def test_training_on_digits_improves_the_bound(name, digits):
    torch.manual_seed(0)
    vae = pv.build_vae(pv.ModelConfig(latent_dims=(4,), hidden=(32,)), digits.data_shape)
    images = digits.evaluation_images("test")
    before = pv.evaluate_elbo(vae, images)["elbo"]
    options = {"outer": 2} if name in ("miwae", "piwae") else {}
    config = pv.TrainConfig(
        estimator=name,
        particles=3,
        estimator_options=options,
        epochs=3,
        batch_size=50,
        lr=0.01,
        eval_samples=0,
        compile=False,
    )
    history = pv.fit(vae, digits, config, progress=False, log=None)
    after = pv.evaluate_elbo(vae, images)["elbo"]
    assert all(math.isfinite(e["train_elbo"]) for e in history.epochs), history.epochs
    assert after > before + 1.0, (name, before, after)
