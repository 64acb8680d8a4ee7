"""The benchmark script runs end to end (tiny settings; timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae import ModelConfig, TrainConfig, build_vae, load_data
from pyro_vae.training.fit import fit

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_modules():
    """``benchmarks/run.py`` and ``tables.py``, imported as the scripts import them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
        import tables
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return run, tables


def test_benchmark_script_runs(tmp_path, mnist_dir):
    out = tmp_path / "bench.json"
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--quick",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--eval-points",
        "2",
        "--example-images",
        "512",
        "--call-images",
        "512",
        "--example-small-images",
        "256",
        "--iwae-call-images",
        "256",
        "--call-repeats",
        "2",
        "--trained-steps",
        "2",
        "--trained-repeats",
        "1",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {r["estimator"] for r in data["training"]} == {"mc", "analytic", "iwae"}
    assert all(r["ratio"] > 0 for r in data["training"])
    calls = [(r["estimator"], r["particles"]) for r in data["whole_calls"]]
    assert calls == [("mc", 1), ("mc", 1), ("analytic", 1), ("analytic", 1), ("iwae", 50)]
    assert all(r["ratio"] > 0 and len(r["first_calls_seconds"]) == 2 for r in data["whole_calls"])
    trained = data["trained_state"]["rows"]
    assert [r["estimator"] for r in trained] == ["iwae", "mc"]
    assert all(r["trained_over_fresh_ours"] > 0 for r in trained)
    assert data["pyro_example"]["ours_over_example"] > 0
    assert [r["batch"] for r in data["pyro_example_small"]] == [32, 20]
    small = data["small_batches"]["rows"]
    assert [(r["estimator"], r["particles"], r["batch"]) for r in small] == [
        ("mc", 1, 20),
        ("iwae", 5, 20),
        ("iwae", 50, 20),
    ]
    assert all(r["threads"] == 1 and r["cpu_capability"] for r in small)
    assert all(r["statistic"] == "abba" and r["rounds"] == 2 for r in small)
    calls = data["whole_calls"]
    assert all(r["statistic"] == "abba" and len(r["group_ratios"]) == 1 for r in calls)
    assert data["environment"]["cpu_capability"] and data["training"][0]["threads"] >= 1
    assert data["evaluation"]["peak_memory_mb"]["ours"] >= 0
    assert data["capture"]["capture_seconds"] > 0 and data["capture"]["machinery_load_mb"] >= 0
    assert "| cell | ours | reference |" in result.stdout


def test_denormal_script_runs(mnist_dir):
    """benchmarks/denormals.py, which the performance page cites, runs end to end."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "denormals.py"), "--data-dir"]
    argv += [str(mnist_dir), "--steps", "2", "--timed-steps", "1", "--rounds", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cells = json.loads(done.stdout.splitlines()[-1])["cells"]
    assert set(cells) == {"fresh", "trained"}
    assert all(0.0 <= c["denormal_share_of_logit_gradient"] <= 1.0 for c in cells.values())


def test_update_replaces_only_the_sections_run(tmp_path):
    """``run.py --update`` keeps the sections it did not run, and records the run of each
    section it replaced (the page then names it)."""
    run, tables = _benchmark_modules()
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps(
            {
                "environment": {"commit": "old"},
                "scaling": {"rows": [1]},
                "whole_calls": [{"old": True}],
            }
        )
    )
    new = {"environment": {"commit": "new"}, "seconds": 60.0, "scaling": {"rows": [2]}}
    merged = run.updated(path, new, ["scaling"])
    assert merged["scaling"] == {"rows": [2]}
    assert merged["whole_calls"] == [{"old": True}]
    assert merged["environment"] == {"commit": "old"}
    assert merged["section_runs"]["scaling"]["commit"] == "new"
    assert "Section scaling measured again later (1 minutes, commit new)" in (
        tables.environment_line(
            {
                **merged,
                "environment": {
                    "cpus": 2,
                    "machine": "x86_64",
                    "threads": 2,
                    "python": "3",
                    "torch": "t",
                    "pyro": "p",
                    "commit": "old",
                },
            }
        )
    )


@pytest.mark.parametrize("estimator,particles", [("mc", 1), ("iwae", 5)])
def test_the_floor_does_the_work_fit_does_at_the_same_seed(estimator, particles):
    """The plain loop draws the batches, binarizations and z that ``fit`` draws at the same
    seed, so a round of the benchmark compares the same work: the epoch's mean loss
    (batch 100: the 1500 images in full batches) equals fit's training loss (float32
    sums of the same numbers in the same order: 1e-5 relative), and another seed gives
    another loss (the test could fail)."""
    run, _ = _benchmark_modules()
    data = load_data("digits", binarize="dynamic")
    network = ModelConfig(latent_dims=(4,), hidden=(16,))
    torch.manual_seed(0)
    start = build_vae(network, data.data_shape).state_dict()

    def floor_loss(seed: int) -> float:
        model = build_vae(network, data.data_shape)
        model.load_state_dict(start)
        losses: list[float] = []
        run.floor_epoch(model, data, estimator, particles, 100, seed, losses=losses)
        return sum(losses) / len(losses) / len(data.train)

    ours = build_vae(network, data.data_shape)
    ours.load_state_dict(start)
    config = TrainConfig(
        estimator=estimator, particles=particles, epochs=1, batch_size=100, seed=3, compile=False
    )
    fit_loss = -fit(ours, data, config, progress=False, log=None).last["train_elbo"]
    assert floor_loss(3) == pytest.approx(fit_loss, rel=1e-5)
    # another seed: other batches and z, a mean over 1500 images that moves by about 1e-3
    assert floor_loss(4) != pytest.approx(fit_loss, rel=1e-4)


def test_same_start_gives_both_sides_a_rounds_parameters_and_seed():
    """Each round: the floor's model is reset to ours' parameters at the round's start,
    and both sides get the round's seed, a new one each round."""
    run, _ = _benchmark_modules()
    ours, floor = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    same = run.SameStart(ours, floor)
    calls = []

    def epoch(model, tag, seed):
        calls.append((tag, seed, model.weight.detach().clone()))
        with torch.no_grad():
            model.weight.add_(1.0)  # a side's training moves its parameters
        return 0.0

    sides = (same.ours_side(epoch, "ours"), same.floor_side(epoch, "floor"))
    for _ in range(3):
        same.snapshot()
        for side in sides:
            side()
    assert [(tag, seed) for tag, seed, _ in calls] == [
        (tag, seed) for seed in (1, 2, 3) for tag in ("ours", "floor")
    ]
    for (_, _, ours_start), (_, _, floor_start) in zip(calls[::2], calls[1::2]):
        assert torch.equal(ours_start, floor_start)


def test_same_noise_script_runs(mnist_dir, tmp_path):
    """benchmarks/same_noise.py, which the performance page cites, runs end to end."""
    out = tmp_path / "same.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "same_noise.py"), "--data-dir"]
    argv += [str(mnist_dir), "--rounds", "1", "--steps", "1", "--repeats", "1", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cells = json.loads(out.read_text())["ms_per_step"]
    names = {f"{side}, seed {seed}" for side in ("ours", "floor") for seed in (0, 1, 2)}
    assert set(cells) == names
    assert all(value > 0 for value in cells.values())


def test_abba_groups_cancel_a_linear_drift_that_single_rounds_do_not():
    """``compared(..., "abba")``: rounds alternate A B, B A, so two make A B B A; under a
    host speed drifting linearly the group's ratio of sums is the true ratio exactly,
    while the single rounds' ratios alternate around it."""
    run, _ = _benchmark_modules()
    true, ours, floor, clock = 1.03, [], [], 0.0
    for round_ in range(8):
        for side in ("ours", "floor") if round_ % 2 == 0 else ("floor", "ours"):
            slowdown = 1 + 0.02 * clock  # the host slows by 2% per call
            clock += 1
            (ours if side == "ours" else floor).append((true if side == "ours" else 1) * slowdown)
    pairs, groups = run.compared(ours, floor), run.compared(ours, floor, "abba")
    assert all(abs(r - true) > 0.015 for r in pairs["round_ratios"])
    assert all(abs(g - true) < 1e-3 for g in groups["group_ratios"]), groups["group_ratios"]
    assert abs(groups["ratio"] - true) < 1e-3 and groups["statistic"] == "abba"
    with pytest.raises(ValueError, match="even number of rounds"):
        run.compared(ours[:3], floor[:3], "abba")


def test_runs_side_by_side_take_the_median_of_their_ratios():
    """``tables.py A.json B.json C.json``: each cell's ratio in every run, and the median of
    the runs' ratios judged against the target (here one run above it, the median not)."""
    _, tables = _benchmark_modules()

    def result(ratio: float) -> dict:
        row = {"estimator": "iwae", "particles": 50, "batch": 128, "ours_ms_per_step": 1.0}
        row |= {"floor_ms_per_step": 1.0, "ratio": ratio, "target": 1.05}
        return {"training": [row | {"ratio_of_pairs_quartiles": [ratio - 0.1, ratio + 0.1]}]}

    table = tables.across_runs([result(1.01), result(1.20), result(1.03)])
    row = table.splitlines()[2]
    assert row.startswith("| step: iwae K=50, batch 128 | 1.010 (0.910-1.110) | 1.200")
    assert row.endswith("| 1.030 | <= 1.05 (holds) |")
    assert tables.across_runs([result(1.06), result(1.2)]).endswith("<= 1.05 (missed) |")


def test_the_performance_page_shows_every_committed_run_side_by_side(tmp_path):
    """``runs_page``: the command that regenerates the table, each run's file and the
    commits it was measured at (the base run's and each re-measured section's), then the
    cells' median over the runs; with one run it says so instead of a table of one."""
    _, tables = _benchmark_modules()

    def result(ratio: float, commit: str) -> dict:
        row = {"estimator": "mc", "particles": 1, "batch": 256, "ours_ms_per_step": 1.0}
        row |= {"floor_ms_per_step": 1.0, "ratio": ratio, "target": 1.05}
        row |= {"ratio_of_pairs_quartiles": [ratio, ratio]}
        return {"environment": {"commit": commit}, "training": [row]}

    paths = []
    for i, (ratio, commit) in enumerate([(1.0, "aaa"), (1.1, "bbb"), (1.02, "ccc")]):
        paths.append(tmp_path / f"{i}.json")
        measured = result(ratio, commit)
        if i == 0:
            measured["section_runs"] = {"training": {"commit": "ddd"}}
        paths[-1].write_text(json.dumps(measured))
    page = tables.runs_page(paths)
    head, _, table = page.partition("\n\n")
    assert head.startswith("`python benchmarks/tables.py ")
    assert f"run 1 `{paths[0]}` (commit aaa, ddd)" in head
    assert f"run 3 `{paths[2]}` (commit ccc)" in head
    assert table.splitlines()[2].endswith("| 1.020 | <= 1.05 (holds) |")
    assert tables.runs_page(paths[:1]) == "Only one run is committed."


def test_call_parts_script_splits_a_call_into_training_evaluation_and_the_rest(mnist_dir, tmp_path):
    """``call_parts.py`` runs, and its parts add up to the call it split."""
    out = tmp_path / "parts.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "call_parts.py"), "--data-dir"]
    argv += [str(mnist_dir), "--images", "512", "--rounds", "1", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    seconds = result["median_seconds"]
    parts = seconds["training"] + seconds["evaluation"] + seconds["rest"]
    assert seconds["call"] == pytest.approx(parts, rel=1e-9)
    assert result["rounds"] == 1 and seconds["plain epoch"] > 0


def test_the_performance_pages_call_parts_table_is_the_committed_output():
    """Each row of the call-parts table on the performance page reads the numbers of
    ``benchmarks/results_call_parts*.json`` (so the page cannot drift from a rerun)."""
    page = (ROOT / "docs" / "performance.md").read_text()
    outputs = {
        256: ROOT / "benchmarks" / "results_call_parts.json",
        128: ROOT / "benchmarks" / "results_call_parts_128.json",
    }
    for batch, path in outputs.items():
        data = json.loads(path.read_text())
        seconds = data["median_seconds"]
        assert data["batch"] == batch
        row = (
            f"| {batch} | {seconds['call']:.3f} s | {seconds['training']:.3f} s | "
            f"{seconds['evaluation']:.3f} s ({100 * data['evaluation_share_of_call']:.1f}%) | "
            f"{seconds['rest']:.3f} s | {seconds['plain epoch']:.3f} s | "
            f"{data['call_over_plain_epoch']:.3f} | {data['training_over_plain_epoch']:.3f} |"
        )
        assert row in page, row


def test_finite_check_script_times_both_versions_of_the_check(mnist_dir, tmp_path):
    """benchmarks/finite_check.py, which the performance page cites, profiles the check's
    reducing operation in both versions; each is found in its own graph."""
    out = tmp_path / "finite.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "finite_check.py"), "--data-dir"]
    argv += [str(mnist_dir), "--rounds", "1", "--steps", "3", "--out", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 2
    assert all(ms > 0 for case in cases for ms in case["ms_per_step"].values())
