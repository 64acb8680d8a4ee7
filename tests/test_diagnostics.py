"""NUTS, gaps and PSIS against the linear-Gaussian ground truth; `pyro-vae diagnose`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pyro_vae.analysis.diagnostics import (
    guide_draws,
    importance_summary,
    inference_gaps,
    nuts_posterior,
    nuts_summary,
    optimize_local_guides,
)
from pyro_vae.app.cli import main
from pyro_vae.models.exact import LinearGaussianVAE
from pyro_vae.objectives.terms import elbo_terms

from .helpers import TINY_RUN


@pytest.fixture
def linear():
    vae = LinearGaussianVAE.random(data_dim=5, latent_dim=2, noise_scale=0.8, seed=3)
    return vae, vae.marginal().sample((3,)).float()


def test_nuts_matches_the_exact_posterior(linear):
    vae, x = linear
    idata = nuts_posterior(vae, x, chains=2, warmup=200, samples=400, seed=1)
    summary = nuts_summary(idata)
    assert summary["rhat_max"] < 1.05 and summary["ess_bulk_min"] > 100
    assert summary["divergences"] == 0
    from pyro_vae.analysis.diagnostics import _arviz

    ess = _arviz().ess(idata)["z"].values  # (image, dim)
    draws = idata.posterior["z"].values.reshape(-1, 3, 2)
    exact = vae.posterior(x)
    mean, sd = exact.mean.detach().numpy(), exact.variance.sqrt().detach().numpy()
    # Monte Carlo error of a mean is sd / sqrt(ESS); of an sd about sd / sqrt(2 ESS)
    assert (np.abs(draws.mean(0) - mean) < 5 * sd / np.sqrt(ess)).all()
    assert (np.abs(draws.std(0) - sd) < 5 * sd / np.sqrt(2 * ess)).all()


def test_guide_draws_have_the_guides_moments(linear):
    vae, x = linear
    idata = guide_draws(vae, x, chains=2, samples=5000)
    draws = idata.posterior["z"].values.reshape(-1, 3, 2)
    loc, scale = (t.detach().numpy() for t in vae.encode(x))
    assert (np.abs(draws.mean(0) - loc) < 5 * scale / math.sqrt(10000)).all()


def test_optimal_local_elbo_reaches_log_p_when_the_family_holds_the_posterior():
    vae = LinearGaussianVAE.random(6, 3, noise_scale=0.7, seed=1, orthogonal=True)
    x = vae.marginal().sample((4,)).float()
    assert vae.mean_field_gap() < 1e-9  # diagonal posterior: no approximation gap
    local = optimize_local_guides(vae, x, steps=1500, lr=0.05)
    summary = importance_summary(local, x, 2000)
    # at the optimum log w is constant in z: the estimate is exact up to float32 rounding
    assert summary["elbo_se"].max() < 1e-3
    torch.testing.assert_close(summary["elbo"], vae.log_marginal(x), atol=5e-3, rtol=0)
    # (the closed-form-KL estimate keeps the reconstruction term's variance)
    analytic = elbo_terms(local, x, kl="analytic", num_samples=2000).elbo.double()
    assert (analytic - vae.log_marginal(x)).abs().max() < 0.3


def test_gaps_match_the_exact_gaps(linear):
    vae, x = linear
    result = inference_gaps(vae, x, is_samples=4000, local_steps=1500)
    approximation_exact = vae.mean_field_gap()
    amortization_exact = (vae.kl_gap(x) - approximation_exact).detach().numpy()
    per = result["per_image"]
    # tolerances: 5 standard errors of the ELBO estimates (from the same draws) plus
    # 0.01 nats for the optimization, which reaches the optimum to ~1e-6 in its
    # parameters; the gaps themselves are about 0.3 (approximation) and 2-9 nats
    local_se = np.array(per["optimal_local_elbo_se"])
    amortized_se = np.array(per["amortized_elbo_se"])
    assert local_se.max() < 0.01
    approximation = np.array(per["approximation_gap"])
    amortization = np.array(per["amortization_gap"])
    assert (np.abs(approximation - approximation_exact) < 5 * local_se + 0.01).all()
    combined = np.sqrt(local_se**2 + amortized_se**2)
    assert (np.abs(amortization - amortization_exact) < 5 * combined + 0.01).all()
    assert np.allclose(per["log_likelihood"], vae.log_marginal(x).detach().numpy(), atol=0.02)
    exact_elbo = vae.exact_elbo(x).detach().numpy()
    assert (np.abs(np.array(per["amortized_elbo"]) - exact_elbo) < 5 * amortized_se).all()
    interval = result["approximation_gap"]
    assert interval["ci95_low"] <= interval["mean"] <= interval["ci95_high"]


TINY = [*TINY_RUN, "--eval-samples", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_diagnose_command(tiny_run, capsys):
    argv = [
        "diagnose",
        str(tiny_run),
        "--images",
        "3",
        "--chains",
        "2",
        "--warmup",
        "50",
        "--samples",
        "50",
        "--is-samples",
        "200",
        "--local-steps",
        "50",
        "--khat-images",
        "30",
        "--khat-samples",
        "100",
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "approximation gap" in printed and "amortization gap" in printed
    out = tiny_run / "diagnostics"
    result = json.loads((out / "diagnostics.json").read_text())
    assert result["image_ids"] == [0, 1, 2] and result["nuts"]["chains"] == 2
    assert set(result["gaps"]["per_image"]) >= {"approximation_gap", "amortization_gap"}
    from pyro_vae.analysis.diagnostics import _arviz

    az = _arviz()
    nuts, guide = az.from_netcdf(str(out / "nuts.nc")), az.from_netcdf(str(out / "guide.nc"))
    assert nuts.posterior["z"].shape == guide.posterior["z"].shape == (2, 50, 3, 3)
    assert az.summary(nuts).shape[0] == 9 and az.summary(guide).shape[0] == 9
    for name in ("marginals_nuts_vs_guide", "khat", "worst_khat_images", "gaps"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 3000
    assert "approximation gap" in (out / "diagnostics.md").read_text()
    # a second run refuses to overwrite
    assert main(argv) == 2
    assert "holds diagnostics" in capsys.readouterr().err


def test_compute_diagnosis_returns_data_and_writes_nothing(tiny_run):
    """The measurements come back as a Diagnosis; no file or folder appears anywhere in
    the run folder, and its dict is what ``diagnostics.json`` holds."""
    from pyro_vae.analysis.diagnostics import Diagnosis
    from pyro_vae.app.diagnose import compute_diagnosis

    before = sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*"))
    diagnosis = compute_diagnosis(
        tiny_run,
        image_ids=[4, 2],
        chains=1,
        warmup=10,
        samples=10,
        is_samples=20,
        local_steps=5,
        khat_images=10,
        khat_samples=20,
        progress=False,
        log=None,
    )
    assert isinstance(diagnosis, Diagnosis)
    assert sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*")) == before
    result = diagnosis.to_dict()
    assert list(result) == [
        "run_dir",
        "image_ids",
        "nuts",
        "guide_vs_nuts",
        "gaps",
        "khat",
        "seconds",
    ]
    assert result["image_ids"] == [4, 2] and result["khat"]["images"] == 10
    assert "note" in result["khat"] and len(diagnosis.worst) == 0  # K=20: no Pareto fit
    json.dumps(result)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--images", "0"], "--images must be >= 1"),
        (["--chains", "0"], "--chains must be >= 1"),
        (["--image-ids", "3,500"], "image index 500 is out of range: the test set has 200"),
    ],
)
def test_diagnose_bad_input(tiny_run, capsys, flags, message, tmp_path):
    code = main(["diagnose", str(tiny_run), *flags, "--out", str(tmp_path / "d"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_diagnose_needs_a_checkpoint(tmp_path, capsys, tiny_run):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text((tiny_run / "config.json").read_text())
    assert main(["diagnose", str(run), "--quiet"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
