"""Every example runs (tiny settings) and prints what it promises."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_train_vae_script(capsys, monkeypatch):
    out = run_example("train_vae.py", ["--epochs", "2", "--limit", "200"], capsys, monkeypatch)
    assert "--- Trace_ELBO ---" in out and "--- TraceMeanField_ELBO ---" in out
    assert out.count("E[log p(x|z)]") == 4 and "KL" in out


def test_train_with_fit_script(capsys, monkeypatch, tmp_path):
    out = run_example(
        "train_with_fit.py",
        ["--epochs", "2", "--limit", "200", "--out", str(tmp_path)],
        capsys,
        monkeypatch,
    )
    assert "mc: best test ELBO" in out and "analytic: best test ELBO" in out
    assert (tmp_path / "mc" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_is_smoke_tested(name):
    tested = Path(__file__).read_text()
    assert name in tested, f"{name} has no smoke test"


def test_compare_estimators_script(capsys, monkeypatch, tmp_path):
    out = run_example(
        "compare_estimators.py",
        [
            "--epochs",
            "1",
            "--limit",
            "200",
            "--draws",
            "10",
            "--eval-samples",
            "10",
            "--out",
            str(tmp_path / "c"),
        ],
        capsys,
        monkeypatch,
    )
    assert "SNR against K" in out and "| dreg |" in out
    assert (tmp_path / "c" / "comparison.md").is_file()


def test_hierarchical_vae_script(capsys, monkeypatch):
    out = run_example(
        "hierarchical_vae.py",
        ["--epochs", "1", "--limit", "200", "--eval-samples", "10"],
        capsys,
        monkeypatch,
    )
    assert "2 layers, bottom-up" in out and "2 layers, top-down" in out
    assert "z1: KL" in out and "z2: KL" in out


def test_own_code_module(monkeypatch):
    """own_code.py is a module named by import path (its CLI use is tested in
    test_own_estimator.py): its factory builds a model the protocol accepts, and its
    beta-ELBO at beta = 1 is the ELBO for the same noise."""
    import pyro
    import torch

    import pyro_vae as pv

    monkeypatch.syspath_prepend(str(EXAMPLES))
    import own_code

    torch.manual_seed(0)
    model = own_code.conv_vae((1, 8, 8), width=4)
    x = torch.bernoulli(pv.DataConfig(dataset="digits", limit=20).load().train.images)
    assert pv.model_sites(model, x).latent == ("z",)
    values = []
    for name in ("own_code:BETA_ELBO", "mc"):
        pyro.set_rng_seed(1)
        with pv.models.protocol.private_param_store():
            values.append(pv.make_elbo(name).loss(model.model, model.guide, x))
    assert values[0] == pytest.approx(values[1], rel=1e-5)
