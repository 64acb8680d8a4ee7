"""`compare` at research grade: budgets (steps, samples, seconds), 95% t-intervals,
paired differences against a baseline, the SNR's slopes against K and M, and figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_vae.analysis.comparison import (
    loglog_slope,
    outer_option,
    paired_differences,
    samples_budget_steps,
    samples_per_step,
    snr_slopes,
    t_interval,
    t_quantile,
)
from pyro_vae.app.cli import main
from pyro_vae.app.compare_plots import _plain_number
from pyro_vae.app.compare_report import markdown_table
from pyro_vae.errors import UserInputError
from pyro_vae.objectives.registry import Estimator, Option, make_elbo

from .helpers import TINY_COMPARE


# ------------------------------------------------------------------ intervals
@pytest.mark.parametrize(
    "dof,quantile",
    # two-sided 95% Student t quantiles from the printed tables (e.g. Owen 1962)
    [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (10**6, 1.960)],
)
def test_t_quantile_matches_the_tables(dof, quantile):
    assert t_quantile(0.95, dof) == pytest.approx(quantile, abs=5e-4)


def test_t_interval_by_hand_and_without_an_interval_for_one_seed():
    interval = t_interval([1.0, 2.0, 3.0])
    # mean 2, sample std 1, half-width t_{0.975, 2} / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    assert interval["mean"] == 2.0 and interval["std"] == pytest.approx(1.0)
    assert interval["half_width"] == pytest.approx(2.4841, abs=1e-4)
    assert interval["low"] == pytest.approx(2 - 2.4841, abs=1e-4)
    single = t_interval([5.0])
    assert single["n"] == 1 and single["mean"] == 5.0 and math.isnan(single["half_width"])
    assert t_interval([1.0, float("nan"), 3.0])["n"] == 2  # a NaN is left out, not averaged


def test_loglog_slope_and_its_standard_error_agree_with_linregress():
    x = np.array([1, 3, 10, 30, 100], dtype=float)
    exact = loglog_slope(x, 3.0 * x**-0.5)
    assert exact["slope"] == pytest.approx(-0.5) and exact["se"] == pytest.approx(0, abs=1e-9)
    rng = np.random.default_rng(0)
    y = 2.0 * x**0.5 * np.exp(rng.normal(0, 0.2, size=x.size))
    fit, reference = loglog_slope(x, y), stats.linregress(np.log(x), np.log(y))
    assert fit["slope"] == pytest.approx(reference.slope)
    assert fit["se"] == pytest.approx(reference.stderr)
    # 5 points: t with 3 degrees of freedom, t_{0.975, 3} = 3.182
    assert fit["high"] - fit["slope"] == pytest.approx(3.182 * reference.stderr, rel=1e-3)
    two = loglog_slope([1, 10], [1, 10])  # a line through two points: no standard error
    assert two["slope"] == pytest.approx(1.0) and math.isnan(two["se"])


def _run(name, seed, elbo, log_p, encoder_snr=1.0, decoder_snr=2.0):
    return {
        "estimator": name,
        "seed": seed,
        "evaluation": {"test_elbo": elbo, "test_log_likelihood": log_p},
        "gradients": {
            "encoder": {"snr_mean": encoder_snr},
            "decoder": {"snr_mean": decoder_snr},
        },
    }


def test_paired_differences_pair_by_seed():
    runs = [
        _run("mc", 0, -10.0, -9.0),
        _run("iwae", 0, -10.5, -8.5, encoder_snr=0.5),
        _run("mc", 1, -12.0, -11.0),
        _run("iwae", 1, -12.1, -10.0, encoder_snr=0.7),
        _run("mc", 2, -11.0, -10.0),
        _run("iwae", 2, -11.3, -9.7, encoder_snr=0.6),
    ]
    rows = {r["metric"]: r for r in paired_differences(runs, ["mc", "iwae"], "mc")}
    assert set(rows) == {"test_log_likelihood", "test_elbo", "encoder_snr", "decoder_snr"}
    logp = rows["test_log_likelihood"]
    assert logp["differences"] == pytest.approx([0.5, 1.0, 0.3]) and logp["seeds"] == [0, 1, 2]
    expected = t_interval([0.5, 1.0, 0.3])
    assert logp["mean"] == pytest.approx(0.6)
    assert logp["half_width"] == pytest.approx(expected["half_width"], rel=1e-12)
    # the paired interval is far narrower than the unpaired spread of either estimator
    assert logp["half_width"] < t_interval([-8.5, -10.0, -9.7])["half_width"]
    assert rows["decoder_snr"]["mean"] == 0.0
    assert paired_differences(runs, ["mc", "iwae"], "iwae")[0]["estimator"] == "mc"


# ------------------------------------------------------------------ budgets
def test_samples_per_step_reads_an_outer_option_by_name_or_help():
    def spec(*options):
        return Estimator("x", "x", lambda k, **_: None, options=options)

    assert outer_option(spec()) is None and samples_per_step(spec(), 5, {}) == 5
    outer = spec(Option("beta", float, 0.5), Option("outer", int, 4))
    assert outer_option(outer).name == "outer"
    assert samples_per_step(outer, 5, {}) == 20 and samples_per_step(outer, 5, {"outer": 8}) == 40
    assert outer_option(spec(Option("M", int, 2))).name == "M"
    assert outer_option(spec(Option("groups", int, 3, "number of outer samples"))).name == "groups"
    assert outer_option(spec(Option("M", float, 2.0))) is None  # a count, not a real number


def test_samples_budget_steps():
    # 20 steps of K = 3 is 60 samples per point; with 12 per step: 5 steps, in 2 epochs of 4
    assert samples_budget_steps(20, 3, 12, 4) == (2, 5)
    assert samples_budget_steps(20, 3, 3, 4) == (5, None)  # K alone: the steps budget itself
    assert samples_budget_steps(20, 3, 6, 4) == (3, 10)
    assert samples_budget_steps(2, 1, 1000, 4) == (1, 1)  # never fewer than one step


class _ToyMIWAE:
    """MIWAE(M, K) of Rainforth et al. (2018) for the tests: the mean of M independent
    IWAE bounds of K particles each (one pass per m: slow, but plainly right)."""

    def __init__(self, num_particles, max_plate_nesting=None, outer=2):
        self.num_particles, self.outer = num_particles, outer
        self.inner = make_elbo("iwae", num_particles, max_plate_nesting=max_plate_nesting)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        losses = [self.inner.differentiable_loss(model, guide, *args, **kwargs)]
        losses += [
            self.inner.differentiable_loss(model, guide, *args, **kwargs)
            for _ in range(self.outer - 1)
        ]
        return torch.stack(losses).mean()

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss)


TOY_MIWAE = Estimator(
    "toy_miwae",
    "MIWAE(M, K) as the mean of M IWAE bounds (tests only)",
    _ToyMIWAE,
    options=(Option("outer", int, 2, "outer samples M", minimum=1),),
    capture="never",
)


def _config(epochs=2, **train):
    from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(latent_dims=(3,), hidden=(16,)),
        data=DataConfig(dataset="digits", limit=200),
        train=TrainConfig(particles=2, epochs=epochs, batch_size=50, **train),
    )


SMALL = dict(
    eval_samples=5, grad_draws=4, snr_particles=(1, 2, 4), bound_particles=(1, 2),
    bound_points=20, eval_points=40, grad_batch=20, progress=False, log=None,
)  # fmt: skip


def test_the_samples_budget_gives_an_estimator_of_m_x_k_samples_1_over_m_of_the_steps(tmp_path):
    """MIWAE(3, 2) draws 6 samples per point and step, mc with K=2 two: under the
    samples budget mc takes the 8 steps of 2 epochs (4 batches each) and toy_miwae
    floor(8 x 2 / 6) = 2, inside its first epoch, so that each data point gets at most
    the 4 samples of z mc gives it; the SNR study measures toy_miwae against K and
    against M and fits the slopes; the report names the budget and says that one seed
    gives no interval."""
    from pyro_vae.app.compare import run_comparison
    from pyro_vae.app.compare_report import write_comparison

    comparison = run_comparison(
        _config(), ["mc", TOY_MIWAE], tmp_path, budget="samples", snr_outer=(1, 2, 4),
        estimator_options={"outer": 3}, **SMALL,
    )  # fmt: skip
    runs = {r["estimator"]: r for r in comparison.runs}
    assert runs["mc"]["steps"] == 8 and runs["mc"]["stopped_by"] == "epochs"
    miwae = runs["toy_miwae"]
    assert miwae["steps"] == 2 and miwae["stopped_by"] == "max_steps" and miwae["epochs"] == 1
    # 2 of the 4 steps of an epoch at 6 samples: 3 per point against mc's 4, the budget
    # rounded down to whole steps (never over it, short of it by less than one step's 1.5)
    assert miwae["samples_per_point"] == pytest.approx(3.0) and runs["mc"]["samples_per_point"] == 4
    assert comparison.budget["estimators"]["toy_miwae"] == {
        "samples_per_step": 6,
        "epochs": 1,
        "max_steps": 2,
    }
    assert comparison.config["train"]["estimator_options"] == {"outer": 3}
    assert comparison.baseline == "mc"
    assert {r["estimator"] for r in comparison.paired_differences} == {"toy_miwae"}
    rows = comparison.snr_versus_particles["rows"]
    assert {(r["estimator"], r.get("varied")) for r in rows} == {
        ("toy_miwae", "K"),
        ("toy_miwae", "M"),
    }
    m_rows = [r for r in rows if r["varied"] == "M"]
    assert [r["outer"] for r in m_rows] == [1, 2, 4] and {r["particles"] for r in m_rows} == {2}
    assert {r["outer"] for r in rows if r["varied"] == "K"} == {3}  # M as compared
    slopes = {(s["group"], s["varied"]): s for s in comparison.snr_slopes}
    assert set(slopes) == {("encoder", "K"), ("decoder", "K"), ("encoder", "M"), ("decoder", "M")}
    # averaging M independent estimates: SNR grows like sqrt(M) for both networks (4
    # draws per point make each SNR noisy: only the sign is asserted)
    assert slopes["decoder", "M"]["slope"] > 0 and slopes["encoder", "M"]["slope"] > 0
    write_comparison(tmp_path, comparison)
    markdown = (tmp_path / "comparison.md").read_text()
    assert "Budget: samples" in markdown and "n=1, no interval" in markdown
    assert "(n=1, no interval)" in markdown  # the paired table's cells
    assert "| toy_miwae | encoder | M = 1, 2, 4 | K=2 |" in markdown
    assert (tmp_path / "plots" / "snr_vs_m.png").exists()


def test_the_seconds_budget_trains_until_the_time_and_records_the_steps(tmp_path):
    from pyro_vae.app.compare import run_comparison

    comparison = run_comparison(
        _config(epochs=500), ["mc"], tmp_path, budget="seconds", budget_seconds=0.6, **SMALL
    )
    (run,) = comparison.runs
    trained = sum(e["seconds"] for e in run["history"])
    assert run["stopped_by"] == "seconds" and trained >= 0.6
    assert 0 < run["steps"] < 500 * 4 and run["train_cpu_seconds"] > 0
    # the time is checked after every step: it overshoots by at most about one step
    # (here well under a second on any machine that ran the steps at all)
    assert trained < 0.6 + 5 * trained / run["steps"] + 1.0


def test_the_tables_carry_t_intervals_not_standard_deviations(tmp_path):
    """Two seeds: each cell's ± is t_{0.975, 1} s / sqrt(2) of the two runs."""
    from pyro_vae.app.compare import run_comparison

    comparison = run_comparison(_config(epochs=1), ["mc", "iwae"], tmp_path, repeats=2, **SMALL)
    values = [r["evaluation"]["test_elbo"] for r in comparison.runs if r["estimator"] == "iwae"]
    half = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / math.sqrt(2)
    row = comparison.summary[1]
    assert row["test_elbo_ci"] == pytest.approx(half)
    table = markdown_table(comparison.summary, 5)
    assert f"| {np.mean(values):.2f} ± {half:.2f} |" in table.splitlines()[3]
    # under the steps budget every run takes the same steps, and the table does not add them
    assert {r["steps"] for r in comparison.runs} == {4} and "samples of z" not in table
    assert "samples of z" in markdown_table(comparison.summary, 5, budget="samples")


def test_snr_slopes_beside_the_predictions():
    rows = [
        {"estimator": "iwae", "particles": k, "varied": "K", "encoder_snr": k**-0.5,
         "decoder_snr": 2 * k**0.5}
        for k in (1, 4, 16)
    ]  # fmt: skip
    rows += [
        {"estimator": "miwae", "particles": 4, "outer": m, "varied": "M", "encoder_snr": m**0.4,
         "decoder_snr": m**0.6}
        for m in (1, 2, 4, 8)
    ]  # fmt: skip
    slopes = {(s["estimator"], s["group"], s["varied"]): s for s in snr_slopes(rows)}
    assert slopes["iwae", "encoder", "K"]["slope"] == pytest.approx(-0.5)
    assert slopes["iwae", "encoder", "K"]["predicted"] == -0.5
    assert slopes["iwae", "decoder", "K"]["predicted"] == 0.5
    assert slopes["miwae", "encoder", "M"]["slope"] == pytest.approx(0.4)
    assert slopes["miwae", "encoder", "M"]["predicted"] == 0.5
    assert slopes["miwae", "decoder", "M"]["fixed"] == {"particles": 4}
    assert ("miwae", "encoder", "K") not in slopes  # (no K rows: nothing to fit)


def test_plain_tick_labels():
    assert [_plain_number(v) for v in (0.5, 2, 20, 3000, 20000)] == ["0.5", "2", "20", "3000",
                                                                      "20000"]  # fmt: skip
    assert _plain_number(2e5) == "2e5" and _plain_number(1e-4) == "1e-4"
    assert _plain_number(0) == ""


# ------------------------------------------------------------------ the command
def test_compare_budget_samples_end_to_end(tmp_path, capsys):
    """The command with a budget, a baseline and two seeds: the figures are PNGs at print
    resolution, the paired table and the SNR slopes are in the report."""
    from PIL import Image

    out = tmp_path / "cmp"
    argv = ["compare", "--estimators", "mc,iwae", *TINY_COMPARE, "--repeats", "2",
            "--budget", "samples", "--baseline", "iwae", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "95% Student-t interval" in printed
    result = json.loads((out / "comparison.json").read_text())
    assert result["budget"]["kind"] == "samples" and result["baseline"] == "iwae"
    assert {r["estimator"] for r in result["paired_differences"]} == {"mc"}
    markdown = (out / "comparison.md").read_text()
    assert "## Paired differences against iwae" in markdown and "| estimator − iwae |" in markdown
    assert "| iwae | encoder | K = 1, 3 |" in markdown and "Rainforth" in markdown
    for name in ("learning_curves", "snr_vs_k", "gradient_variance", "paired_differences",
                 "bounds_vs_k"):  # fmt: skip
        with Image.open(out / "plots" / f"{name}.png") as image:
            assert image.info["dpi"][0] == pytest.approx(200, abs=1)
        assert f"![{name}](plots/{name}.png)" in markdown


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--budget", "seconds"], "--budget seconds needs --seconds S"),
        (["--seconds", "5"], "--seconds applies to --budget seconds"),
        (["--budget", "seconds", "--seconds", "-1"], "--seconds must be > 0"),
        (["--estimators", "mc,iwae", "--baseline", "dreg"], "--baseline dreg is not among"),
        (["--snr-outer", "0,2"], "every M in --snr-outer must be >= 1"),
    ],
)
def test_compare_budget_bad_input(flags, message, tmp_path, capsys):
    code = main(["compare", *TINY_COMPARE, *flags, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_library_budget_bad_input(tmp_path):
    from pyro_vae.app.compare import run_comparison

    for settings, message in (
        ({"budget": "flops"}, "budget must be one of steps, samples, seconds"),
        ({"budget": "seconds"}, "needs budget_seconds"),
        ({"budget_seconds": 3.0}, "budget_seconds applies to the budget 'seconds'"),
        ({"baseline": "dreg"}, "the baseline estimator dreg is not among"),
    ):
        with pytest.raises(UserInputError, match=message):
            run_comparison(_config(), ["mc"], tmp_path, **{**SMALL, **settings})


def test_fit_stops_at_max_steps_inside_an_epoch_and_a_resume_stays_stopped(tmp_path):
    from pyro_vae.config import ModelConfig, TrainConfig
    from pyro_vae.data import load_data
    from pyro_vae.models.build import build_vae
    from pyro_vae.training.fit import fit

    data = load_data("digits", None, "dynamic", 0, seed=0, limit=200)  # 4 batches of 50
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(latent_dims=(2,), hidden=(8,)), data.data_shape)
    config = TrainConfig(epochs=3, batch_size=50, max_steps=5, compile=False)
    history = fit(vae, data, config, run_dir=tmp_path, progress=False, log=None)
    assert [(e["epoch"], e["step"]) for e in history.epochs] == [(1, 4), (2, 5)]
    again = fit(vae, data, config, run_dir=tmp_path, resume=True, progress=False, log=None)
    assert [e["step"] for e in again.epochs] == [4, 5]  # spent: no step more
    with pytest.raises(UserInputError, match="max_steps must be an integer >= 1"):
        TrainConfig(max_steps=0)
    with pytest.raises(UserInputError, match="max_seconds must be > 0"):
        TrainConfig(max_seconds=0.0)
