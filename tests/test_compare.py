"""Gradient diagnostics, bound tightness and `pyro-vae compare`."""

from __future__ import annotations

import csv
import json

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae.analysis.bounds import bound_tightness
from pyro_vae.analysis.gradients import (
    estimator_gradient_statistics,
    gradient_statistics,
    snr_versus_particles,
)
from pyro_vae.app.cli import main
from pyro_vae.app.compare_checks import check_estimators_run, parse_estimators
from pyro_vae.errors import UserInputError
from pyro_vae.models.exact import LinearGaussianVAE

from .helpers import TINY_COMPARE, exact_grads


def test_gradient_statistics_on_known_draws():
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.0])
    std = torch.tensor([0.5, 4.0, 1.0])
    draws = mean + std * torch.randn(20000, 3, dtype=torch.float64)
    stats = gradient_statistics(draws, reference=mean)
    # SNR = |mean| / std = (2, 0.5, 0): mean 0.833; 2e4 draws pin it to about 1%
    assert stats["snr_mean"] == pytest.approx((2 + 0.5 + 0) / 3, rel=0.03)
    assert stats["variance"] == pytest.approx(0.25 + 16 + 1, rel=0.03)
    assert stats["bias_z_max"] < 5
    shifted = gradient_statistics(draws, reference=mean + 0.5)
    assert shifted["bias_z_max"] > 20


@pytest.fixture
def linear():
    vae = LinearGaussianVAE.random(data_dim=5, latent_dim=2, noise_scale=0.8, seed=3)
    return vae, vae.marginal().sample((16,)).float()


def test_estimator_statistics_against_the_exact_gradient(linear):
    vae, x = linear
    reference = exact_grads(vae, -vae.exact_elbo(x).sum())
    stats = estimator_gradient_statistics(vae, x, "mc", 5, 400, reference=reference)
    assert set(stats) == {"encoder", "decoder"}
    for group in ("encoder", "decoder"):
        assert stats[group]["bias_z_max"] < 5  # unbiased: within 5 standard errors
        assert stats[group]["relative_bias"] < 0.1
    biased = estimator_gradient_statistics(vae, x, "penalty", 5, 400, reference=reference)
    assert biased["encoder"]["bias_z_max"] > 10  # the penalty's gradient is not the ELBO's


@pytest.fixture
def fitted():
    """A guide near the exact posterior (posterior KL gap 0.74 nats)."""
    vae = LinearGaussianVAE.random(6, 3, noise_scale=0.7, seed=1, orthogonal=True)
    x = vae.marginal().sample((16,)).float()
    vae.set_guide_to_posterior()
    with torch.no_grad():
        vae.encoder.loc.bias += 0.3
        vae.encoder.raw_scale += 0.3
    return vae, x


def test_iwae_encoder_snr_falls_with_k_and_dregs_does_not(fitted):
    # where the asymptotics apply; measured with 300 draws: IWAE encoder SNR 0.77, 0.25,
    # 0.073 and DReG 2.1, 2.7, 8.1 at K = 1, 10, 100; decoder SNR 1.1, 2.0, 6.7 for both
    vae, x = fitted
    rows = snr_versus_particles(vae, x, ("iwae", "dreg"), (1, 10, 100), num_draws=300)
    snr = {(r["estimator"], r["particles"]): r for r in rows}
    # Rainforth et al. (2018): IWAE's inference-network SNR decays like 1/sqrt(K)
    assert snr["iwae", 100]["encoder_snr"] < 0.2 * snr["iwae", 1]["encoder_snr"]
    # Tucker et al. (2018): DReG's grows instead
    assert snr["dreg", 100]["encoder_snr"] > 2 * snr["dreg", 1]["encoder_snr"]
    # the generative network's SNR grows with K for both, and is the same gradient
    for name in ("iwae", "dreg"):
        assert snr[name, 100]["decoder_snr"] > 3 * snr[name, 1]["decoder_snr"]


def test_bound_tightness_on_the_linear_gaussian(fitted):
    vae, x = fitted
    result = bound_tightness(vae, x, particles=(1, 5, 50), num_samples=4000)
    l1, l5, l50 = result["bound_means"]
    assert l1 < l5 < l50 < result["log_likelihood"] + 0.05
    assert result["log_likelihood"] == pytest.approx(result["exact_log_marginal"], abs=0.1)
    assert l1 == pytest.approx(result["exact_elbo"], abs=0.5)
    assert result["gap_log_likelihood_minus_elbo"] > 0


def test_penalty_exceeds_log_likelihood_for_a_sharp_posterior():
    vae = LinearGaussianVAE.random(6, 3, noise_scale=0.05, seed=1, orthogonal=True)
    x = vae.marginal().sample((30,)).float()
    vae.set_guide_to_posterior()
    result = bound_tightness(vae, x, particles=(1, 5), num_samples=500)
    # KL ~ -log(sigma) per dimension while the penalty stays below 1 + mu^2: for all but
    # the points with the largest posterior means (where mu^2 > mu^2 / 2 wins) the
    # "objective" is above log p(x), which no lower bound can be (measured: 28 of 30)
    assert result["penalty_exceeds_log_likelihood_share"] > 0.8
    assert result["penalty_minus_log_likelihood"] > 3


def test_estimator_names_are_checked():
    assert parse_estimators("mc, dreg") == ["mc", "dreg"]
    with pytest.raises(UserInputError, match="unknown estimator.*elbo3"):
        parse_estimators("mc,elbo3")
    with pytest.raises(UserInputError, match="listed twice"):
        parse_estimators("mc,mc")
    with pytest.raises(UserInputError, match="at least 2 draws"):
        estimator_gradient_statistics(
            LinearGaussianVAE.random(3, 2), torch.zeros(4, 3), "mc", 1, num_draws=1
        )


class _GammaVAE(nn.Module):
    """A model whose guide is not Gaussian: the path estimators must refuse it."""

    def __init__(self):
        super().__init__()
        self.rate = nn.Parameter(torch.ones(()))

    def flatten(self, x):
        return x

    def model(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(self, x, num_data=None):
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Gamma(2.0, nn.functional.softplus(self.rate)))


def test_an_estimator_that_cannot_run_is_named():
    vae = _GammaVAE()
    check_estimators_run(vae, torch.ones(4), ["mc", "iwae"], 2)
    with pytest.raises(UserInputError, match="estimator stl cannot run with this model"):
        check_estimators_run(vae, torch.ones(4), ["mc", "stl"], 2)


TINY = TINY_COMPARE


def test_compare_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--estimators",
            "mc,analytic,iwae,stl,dreg,penalty",
            *TINY,
            "--repeats",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| penalty |" in printed
    result = json.loads((out / "comparison.json").read_text())
    assert [row["estimator"] for row in result["summary"]] == [
        "mc",
        "analytic",
        "iwae",
        "stl",
        "dreg",
        "penalty",
    ]
    assert len(result["runs"]) == 12
    steps = {run["steps"] for run in result["runs"]}
    assert steps == {8}  # equal budget: 2 epochs of 4 batches, every estimator
    with open(out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {
        "estimator",
        "test_elbo",
        "test_log_likelihood",
        "test_log_likelihood_std",
        "encoder_snr",
        "decoder_snr",
        "encoder_variance",
        "seconds_per_epoch",
    } <= set(rows[0])
    markdown = (out / "comparison.md").read_text()
    assert "| estimator | test ELBO |" in markdown and "±" in markdown
    # every table names its K; the bounds' log p(x) uses at least the largest bound's K
    assert f"test log p(x), K={result['eval_samples']}" in markdown
    for bounds in result["bounds_versus_particles"].values():
        assert bounds["log_likelihood_samples"] >= max(bounds["particles"])
        assert f"log p(x), K={bounds['log_likelihood_samples']}" in markdown
    assert "CPU s / epoch" in markdown and "units with KL > 0.1 nats" in markdown
    assert all(run["train_cpu_seconds"] > 0 for run in result["runs"])
    for name in ("learning_curves", "snr_vs_k", "gradient_variance", "bounds_vs_k"):
        path = out / "plots" / f"{name}.png"
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000
    # refuses to overwrite
    assert main(["compare", *TINY, "--out", str(out)]) == 2
    assert "holds a comparison" in capsys.readouterr().err


def test_compare_refuses_a_folder_that_holds_something_else(tmp_path, capsys):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "learning_curves.png").write_bytes(b"a training run's plot")
    code = main(["compare", *TINY, "--out", str(tmp_path)])
    assert code == 2 and "holds no comparison" in capsys.readouterr().err
    assert (tmp_path / "plots" / "learning_curves.png").read_bytes() == b"a training run's plot"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--estimators", "mc,foo"], "unknown estimator 'foo'"),
        (["--estimators", "mc,mc"], "an estimator is listed twice"),
        (["--estimators", "mc,iwae", "--alpha", "0.3"], "no estimator compared takes the option"),
        (["--eval-points", "-3"], "--eval-points must be >= 1"),
        (["--particles", "0"], "--particles must be >= 1"),
        (["--grad-draws", "1"], "--grad-draws must be >= 2"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_compare_bad_input(flags, message, tmp_path, capsys):
    code = main(["compare", *TINY, *flags, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_run_comparison_returns_data_and_writes_only_its_run_folders(tmp_path):
    """Computing is apart from rendering: the comparison comes back as a dataclass, only
    the trained runs' folders are written, and rendering it gives its JSON exactly."""
    from pyro_vae.analysis.comparison import Comparison
    from pyro_vae.app.compare import run_comparison
    from pyro_vae.app.compare_report import write_comparison
    from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    config = RunConfig(
        model=ModelConfig(latent_dims=(3,), hidden=(16,)),
        data=DataConfig(dataset="digits", limit=200),
        train=TrainConfig(particles=2, epochs=1, batch_size=50),
    )
    out = tmp_path / "cmp"
    comparison = run_comparison(
        config,
        ["mc", "analytic"],
        out,
        eval_samples=5,
        grad_draws=3,
        snr_particles=(1,),
        bound_particles=(1, 2),
        bound_points=20,
        eval_points=40,
        progress=False,
        log=None,
    )
    assert isinstance(comparison, Comparison)
    assert [p.name for p in out.iterdir()] == ["runs"]
    assert {p.name for p in (out / "runs").iterdir()} == {"mc-seed0", "analytic-seed0"}
    result = comparison.to_dict()
    assert list(result)[:3] == ["command", "config", "estimators"] and len(result["runs"]) == 2
    assert all("parameters" not in run for run in result["runs"])
    write_comparison(out, comparison)
    written = json.loads((out / "comparison.json").read_text())
    written.pop("null_values", None)  # NaNs are written as null, and listed there
    assert (
        list(written) == list(result)
        and written["runs_wall_seconds"] == (result["runs_wall_seconds"])
    )
    assert [row["estimator"] for row in written["summary"]] == ["mc", "analytic"]
    assert {p.name for p in out.iterdir()} == {
        "runs",
        "comparison.json",
        "comparison.csv",
        "comparison.md",
        "plots",
    }


def test_the_default_estimators_leave_analytic_out_only_where_its_kl_is_biased(capsys):
    from pyro_vae import ModelConfig, build_vae
    from pyro_vae.app.cli import build_parser
    from pyro_vae.app.commands.compare import COMPARE_ESTIMATORS

    def defaults(*flags):
        from pyro_vae.app.commands.compare import _default_estimators

        return _default_estimators(build_parser().parse_args(["compare", *flags]))

    assert defaults() == list(COMPARE_ESTIMATORS)
    assert defaults("--latent-dims", "4,2", "--guide", "top-down") == list(COMPARE_ESTIMATORS)
    capsys.readouterr()
    several = defaults("--latent-dims", "4,2")
    assert "analytic" not in several and len(several) == len(COMPARE_ESTIMATORS) - 1
    assert "analytic is left out" in capsys.readouterr().err
    # what is left runs on that model; analytic itself would be refused
    vae = build_vae(ModelConfig(latent_dims=(4, 2), hidden=(8,)), (1, 8, 8))
    x = torch.rand(4, 1, 8, 8).bernoulli()
    check_estimators_run(vae, x, parse_estimators(several), 2)
    with pytest.raises(UserInputError, match="estimator analytic cannot run"):
        check_estimators_run(vae, x, ["analytic"], 2)


def test_a_commands_data_cache_reads_each_set_once_and_travels_empty(monkeypatch):
    """The runs of one comparison or sweep share its DataCache; another command's cache,
    or a copy pickled for a Ray task, reads the files again (no process-wide state)."""
    import pickle

    import pyro_vae.data as data_module
    from pyro_vae.app.training_run import DataCache
    from pyro_vae.config import DataConfig

    reads = []
    real = data_module.load_data

    def counted(*args, **kwargs):
        reads.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(data_module, "load_data", counted)
    cache, config = DataCache(), DataConfig(dataset="digits", limit=60)
    first = cache.get(config, 0)
    assert cache.get(config, 0) is first and reads == [0]
    assert cache.get(config, 1) is not first and reads == [0, 1]
    assert pickle.loads(pickle.dumps(cache)).get(config, 0) is not first and reads == [0, 1, 0]
    assert DataCache().get(config, 0) is not first and len(reads) == 4
