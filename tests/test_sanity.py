"""Numbers that cannot be right are flagged beside the number, never printed plainly."""

from __future__ import annotations

import json

from pyro_vae.analysis.sanity import comparison_flags, evaluation_flags, history_flags
from pyro_vae.app.compare_report import markdown_table

from .helpers import TINY_RUN, run_cli


def _epochs(*rows):
    return [
        {"epoch": i + 1, "train_elbo": e, "test_elbo": t, "test_kl": k}
        for i, (e, t, k) in enumerate(rows)
    ]


def test_the_issue_s_dreg_run_is_flagged_every_way_it_was_wrong():
    # (the DReG run of the scale bug: train bound +775, +1184; KL 28 -> 315)
    epochs = _epochs((775.08, -64.54, 28.2), (1184.81, -356.07, 315.1))
    flags = history_flags(epochs, binary=True, is_bound=True)
    reasons = {(f.where, f.quantity) for f in flags}
    assert ("epoch 1", "train_elbo") in reasons and ("epoch 2", "train_elbo") in reasons
    assert ("epoch 2", "test_kl") in reasons  # a tenfold jump of the KL


def test_healthy_histories_and_non_binary_data_are_not_flagged():
    healthy = _epochs((-36.1, -36.1, 2.4), (-30.5, -30.6, 1.6), (-29.3, -29.3, 1.3))
    assert history_flags(healthy, binary=True) == []
    # a Gaussian density can exceed 1: a positive ELBO is possible there
    assert history_flags(_epochs((12.0, 11.0, 3.0)), binary=False) == []
    # a small KL growing tenfold by less than a nat is not a jump
    assert history_flags(_epochs((-30.0, -30.0, 0.01), (-30.0, -30.0, 0.5)), binary=True) == []
    # the penalty is not a bound: its objective above 0 is no contradiction
    assert not [
        f
        for f in history_flags(_epochs((3.0, -5.0, 1.0)), binary=True, is_bound=False)
        if f.quantity == "train_elbo"
    ]


def test_an_elbo_or_bound_above_log_p_x_is_flagged():
    evaluation = {"test_elbo": -99.0, "test_log_likelihood": -100.0}
    assert [f.quantity for f in evaluation_flags(evaluation, binary=True)] == ["test_elbo"]
    assert evaluation_flags({"test_elbo": -100.2, "test_log_likelihood": -100.0}, binary=True) == []
    flags = evaluation_flags({"test_log_likelihood": -100.0}, binary=True, objective=-97.0)
    assert [f.quantity for f in flags] == ["objective"]
    assert (
        evaluation_flags(
            {"test_log_likelihood": -100.0}, binary=True, objective=-97.0, is_bound=False
        )
        == []
    )


def test_an_estimator_far_below_the_others_or_above_its_log_p_x_is_flagged():
    # the issue's compare: stl -239.66 and dreg -248.80 against mc's -26.04
    summary = [
        {
            "estimator": "mc",
            "test_elbo": -26.0,
            "test_log_likelihood": -25.5,
            "objective_minus_log_likelihood": -0.5,
        },
        {
            "estimator": "iwae",
            "test_elbo": -26.5,
            "test_log_likelihood": -25.2,
            "objective_minus_log_likelihood": 2.0,
        },
        {
            "estimator": "analytic",
            "test_elbo": -26.1,
            "test_log_likelihood": -25.6,
            "objective_minus_log_likelihood": -0.4,
        },
        {
            "estimator": "stl",
            "test_elbo": -239.66,
            "test_log_likelihood": -230.0,
            "objective_minus_log_likelihood": -3.0,
        },
        {
            "estimator": "penalty",
            "test_elbo": -30.0,
            "test_log_likelihood": -27.0,
            "objective_minus_log_likelihood": 28.0,
        },
    ]
    flags = comparison_flags(summary, binary=True, bounds=["mc", "iwae", "analytic", "stl"])
    found = {(f.where, f.quantity) for f in flags}
    assert found == {
        ("estimator stl", "test_log_likelihood"),
        ("estimator iwae", "objective_minus_log_likelihood"),
    }
    table = markdown_table([dict(row, **_rest()) for row in summary], 100, flagged={"stl", "iwae"})
    assert "| stl ⚠ |" in table and "| iwae ⚠ |" in table and "| mc |" in table


def _rest():
    fields = ("encoder_snr", "decoder_snr", "seconds_per_epoch", "cpu_seconds_per_epoch")
    row = {
        "repeats": 1,
        "encoder_variance": 1.0,
        "decoder_variance": 1.0,
        "active_units": 1,
        "informative_units": 1,
    }
    for name in (*fields, "test_elbo", "test_log_likelihood", "objective_minus_log_likelihood"):
        row.setdefault(name, 0.0)
        row[f"{name}_std"] = 0.0
    return {
        k: v
        for k, v in row.items()
        if k not in ("test_elbo", "test_log_likelihood", "objective_minus_log_likelihood")
    }


def test_a_train_run_records_its_flags(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["train", *TINY_RUN, "--epochs", "2", "--eval-samples", "10", "--out", out], capsys
    )
    assert code == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["flags"] == [] and "warning:" not in err
    assert "Warnings" not in (out / "report.md").read_text()
