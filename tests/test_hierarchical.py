"""The hierarchical VAE: structure, estimators, analytic-KL validity, free bits, resume."""

from __future__ import annotations

import json

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae import ModelConfig, TrainConfig, build_vae, elbo_terms, load_data, make_elbo
from pyro_vae.app.cli import main
from pyro_vae.errors import UserInputError
from pyro_vae.models.hierarchical import HierarchicalVAE, default_hiddens
from pyro_vae.objectives.free_bits import FreeBitsELBO
from pyro_vae.objectives.registry import check_estimator_fits
from pyro_vae.objectives.traces import sample_sites
from pyro_vae.training.fit import fit
from pyro_vae.training.schedules import LatentScale

SHAPE = (1, 8, 8)


def _vae(dims=(8, 4), guide="top-down", seed=0):
    torch.manual_seed(seed)
    return build_vae(ModelConfig(latent_dims=dims, hidden=(32,), guide=guide), SHAPE)


@pytest.fixture(scope="module")
def data():
    return load_data("digits", limit=300)


@pytest.mark.parametrize("guide", ["top-down", "bottom-up"])
@pytest.mark.parametrize("dims", [(8, 4), (10, 6, 3)])
def test_structure_shapes_sampling_reconstruction(guide, dims, data):
    vae = _vae(dims, guide)
    assert isinstance(vae, HierarchicalVAE)
    x = data.evaluation_images()[:7]
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    sites = [f"z{i + 1}" for i in range(len(dims))]
    for site, dim in zip(sites, dims):
        assert guide_trace.nodes[site]["value"].shape == (7, dim)
    model_order = [s["name"] for s in sample_sites(model_trace)]
    guide_order = [s["name"] for s in sample_sites(guide_trace)]
    assert model_order[:-1] == list(reversed(sites)) and model_order[-1] == "x"
    assert guide_order == (list(reversed(sites)) if guide == "top-down" else sites)
    assert vae.reconstruct(x).shape == x.shape
    assert vae.sample(5).shape == (5, *SHAPE)
    assert vae.encode(x)[0].shape == (7, dims[-1])
    terms = elbo_terms(vae, x, kl="mc", num_samples=3)
    assert set(terms.kl_by_site) == set(sites)
    for name in ("mc", "iwae", "renyi", "stl", "dreg", "penalty") + (
        ("analytic",) if guide == "top-down" else ()
    ):
        loss = make_elbo(name, 3).loss_and_grads(vae.model, vae.guide, x)
        assert torch.isfinite(torch.tensor(loss))


def test_iwae_paper_widths():
    assert default_hiddens((100, 50), (200, 200)) == [(200, 200), (100, 100)]
    vae = build_vae(ModelConfig(latent_dims=(100, 50)), (1, 28, 28))
    sizes = [tuple(p.shape) for p in vae.encoder.parameters()]
    assert (200, 784) in sizes and (100, 200) in sizes  # 784-200-200 then 200-100-100


def test_bottom_up_with_analytic_kl_is_refused_everywhere(data, capsys, tmp_path):
    vae = _vae(guide="bottom-up")
    with pytest.raises(UserInputError, match="biased for this model: with the bottom-up guide"):
        check_estimator_fits("analytic", vae)
    with pytest.raises(
        UserInputError, match="the top-down guide makes it exact. Use the .mc. estimator"
    ):
        fit(vae, data, TrainConfig(estimator="analytic", epochs=1), log=None)
    with pytest.raises(UserInputError, match="biased for this model: with the bottom-up guide"):
        elbo_terms(vae, data.evaluation_images()[:5], kl="analytic")
    check_estimator_fits("analytic", _vae(guide="top-down"))  # fine
    code = main(
        [
            "train",
            "--limit",
            "100",
            "--latent-dims",
            "8,4",
            "--guide",
            "bottom-up",
            "--estimator",
            "analytic",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "biased for this model: with the bottom-up guide" in err
        and len(err.splitlines()) == 1
    )
    assert not (tmp_path / "r").exists()


def test_free_bits_keep_the_value_and_cut_the_kl_gradient(data):
    vae = _vae()
    x = data.evaluation_images()[:20]

    def loss_and_grads(elbo, scale=None):
        pyro.set_rng_seed(3)
        vae.zero_grad()
        if scale is None:
            loss = elbo.loss_and_grads(vae.model, vae.guide, x)
        else:
            with LatentScale(scale):
                loss = elbo.loss_and_grads(vae.model, vae.guide, x)
        return loss, [p.grad.clone() for p in vae.parameters() if p.grad is not None]

    for kl in ("analytic", "mc"):
        plain = make_elbo(kl, 2)
        nothing_free = loss_and_grads(FreeBitsELBO(2, free_bits=0.0, kl=kl))
        reference = loss_and_grads(plain)
        assert nothing_free[0] == pytest.approx(reference[0], rel=1e-5)
        for a, b in zip(nothing_free[1], reference[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        # every layer below the threshold: the same value, and the gradient of the
        # reconstruction term alone (as with the KL scaled by 0, for the same noise)
        all_free = loss_and_grads(FreeBitsELBO(2, free_bits=1e6, kl=kl))
        no_kl = loss_and_grads(plain, scale=0.0)
        assert all_free[0] == pytest.approx(reference[0], rel=1e-5)
        for a, b in zip(all_free[1], no_kl[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_free_bits_need_an_elbo_estimator():
    with pytest.raises(UserInputError, match="free bits apply to the KL"):
        TrainConfig(estimator="iwae", free_bits=0.5)


def test_resume_reproduces_a_hierarchical_run(data, tmp_path):
    import dataclasses

    config = TrainConfig(estimator="analytic", epochs=4, batch_size=64, free_bits=0.1)
    straight = _vae()
    history = fit(straight, data, config, run_dir=tmp_path / "a", log=None)
    interrupted = _vae()
    fit(interrupted, data, dataclasses.replace(config, epochs=2), run_dir=tmp_path / "b", log=None)
    resumed = _vae(seed=7)
    resumed_history = fit(resumed, data, config, run_dir=tmp_path / "b", resume=True, log=None)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [e["test_elbo"] for e in history.epochs] == [
        e["test_elbo"] for e in resumed_history.epochs
    ]
    last = history.last
    assert {"test_kl_z1", "test_kl_z2", "test_active_units_z1", "test_active_units_z2"} <= set(last)
    assert last["test_kl"] == pytest.approx(last["test_kl_z1"] + last["test_kl_z2"])


def test_hierarchical_cli_run_reports_layers(tmp_path, capsys):
    out = tmp_path / "h"
    code = main(
        [
            "train",
            "--limit",
            "200",
            "--latent-dims",
            "8,4",
            "--hidden",
            "32",
            "--guide",
            "bottom-up",
            "--epochs",
            "2",
            "--eval-samples",
            "20",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation["active_units_by_site"]) == {"z1", "z2"}
    assert evaluation["latent_dims"] == 12
    report = (out / "report.md").read_text()
    assert "| z1 |" in report and "| z2 |" in report and "kl_per_layer.png" in report
    assert (out / "plots" / "kl_per_layer.png").stat().st_size > 5000
    code = main(["evaluate", str(out), "--samples", "10", "--json"])
    assert code == 0
