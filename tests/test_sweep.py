"""`pyro-vae sweep` and `compare` on the serial and the Ray executor: same runs, same numbers.

Ray is started once for the module (2 CPUs). Each comparison is run by run: the same
seeds give bit-identical parameters and evaluations on CPU wherever a run trains, also
when its worker is killed mid-run and the retried task resumes from the run's
checkpoint. That holds on any CPU because both executors run each task with the same
torch thread count (a float32 sum split over another number of threads may differ in
its last bits, as AVX-512 kernels do): the test right below checks that first.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae.app.cli import main
from pyro_vae.app.executors import RayExecutor, SerialExecutor, make_executor
from pyro_vae.app.sweep import expand_grid, run_sweep, sweep_run
from pyro_vae.errors import UserInputError
from pyro_vae.training.checkpoint import load_checkpoint

from .helpers import TINY_COMPARE

GRID = {
    "base": {
        "data": {"dataset": "digits", "limit": 200},
        "model": {"hidden": [8], "latent_dims": [2]},
        "train": {"epochs": 2, "batch_size": 50, "eval_samples": 10},
    },
    "grid": {"train.estimator": ["mc", "analytic"], "train.seed": [0, 1]},
}
#: what differs between two executions of the same run: wall times, folders, resumption
VOLATILE = ("seconds", "run_dir", "resumed_at_epoch")


def _stable(value):
    """``value`` without its timings and paths, for run-by-run equality."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not any(word in k for word in VOLATILE)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _threads(_: object) -> int:
    return torch.get_num_threads()


def test_each_executor_runs_a_task_with_the_threads_of_its_cpus_per_run(ray_cluster):
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    caller = 2 if torch.get_num_threads() == 1 else 1  # not the count the runs get
    before = torch.get_num_threads()
    torch.set_num_threads(caller)
    try:
        for cpus, threads in [(None, 1), (2, 2)]:
            with make_executor("ray", cpus_per_run=cpus) as ray_executor:
                assert ray_executor.map(_threads, [0, 1]) == [threads, threads]
            with make_executor("serial", cpus_per_run=cpus) as serial_executor:
                assert serial_executor.map(_threads, [0, 1]) == [threads, threads]
            assert torch.get_num_threads() == caller  # the serial executor gave it back
        assert SerialExecutor(threads=None).map(_threads, [0]) == [caller]
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "grid.json"
    path.write_text(json.dumps(GRID))
    return path


@pytest.fixture(scope="module")
def serial_sweep(tmp_path_factory, grid_file) -> dict:
    out = tmp_path_factory.mktemp("sweeps") / "serial"
    assert main(["sweep", "--grid", str(grid_file), "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "sweep.json").read_text())


def test_ray_sweep_equals_the_serial_sweep_run_by_run(
    ray_cluster, grid_file, serial_sweep, tmp_path, capsys
):
    out = tmp_path / "ray"
    code = main(
        ["sweep", "--grid", str(grid_file), "--out", str(out), "--executor", "ray", "--quiet"]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "sweep.json").read_text())
    assert result["executor"] == "ray" and serial_sweep["executor"] == "serial"
    names = [run["name"] for run in result["runs"]]
    assert names == [
        "000-estimator-mc_seed-0",
        "001-estimator-mc_seed-1",
        "002-estimator-analytic_seed-0",
        "003-estimator-analytic_seed-1",
    ]
    assert [run["name"] for run in serial_sweep["runs"]] == names
    for ray_run, serial_run in zip(result["runs"], serial_sweep["runs"]):
        assert _stable(ray_run) == _stable(serial_run)  # parameters' SHA-256 included
        assert ray_run["steps"] == 8  # 2 epochs of 4 batches of 50
        # every run is a run folder: config, checkpoint and metrics of its own
        folder = out / ray_run["name"]
        assert {"config.json", "checkpoint.pt", "metrics.jsonl", "evaluation.json"} <= {
            p.name for p in folder.iterdir()
        }
        saved = json.loads((folder / "config.json").read_text())
        assert saved["train"]["estimator"] == ray_run["overrides"]["train.estimator"]
    # the seeds differ between runs, so the digests do too: the equality above is not vacuous
    assert len({run["parameters_sha256"] for run in result["runs"]}) == 4
    table = (out / "sweep.md").read_text()
    assert "| 002-estimator-analytic_seed-0 | analytic | 0 | 2 |" in table
    assert "test log p(x) (K)" in table and " (10) |" in table
    # a finished sweep resumes to the same results, training nothing
    assert main(["sweep", "--grid", str(grid_file), "--out", str(out), "--resume", "--quiet"]) == 0
    resumed = json.loads((out / "sweep.json").read_text())
    assert [r["resumed_at_epoch"] for r in resumed["runs"]] == [2, 2, 2, 2]
    assert _stable(resumed["runs"]) == _stable(serial_sweep["runs"])


def _dies_once_after_its_first_epoch(spec: dict) -> dict:
    """:func:`sweep_run`, but run 001 kills its own process (SIGKILL) once, right after
    its first epoch's checkpoint: the worker dies as it would when a node is lost."""
    marker = Path(spec["run_dir"]).parent / f"killed-{spec['name']}"

    def kill_once(metrics: dict) -> None:
        if spec["name"].startswith("001-") and metrics["epoch"] == 1 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return sweep_run(spec, callbacks=[kill_once])


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(
    ray_cluster, serial_sweep, tmp_path
):
    # the worker must import this module to run the function above
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runs = expand_grid(GRID)
    with RayExecutor(max_retries=2) as executor:
        result = run_sweep(
            runs,
            tmp_path,
            executor,
            log=None,
            run_function=_dies_once_after_its_first_epoch,
        )
    killed = tmp_path / "killed-001-estimator-mc_seed-1"
    assert killed.exists() and int(killed.read_text()) != os.getpid()
    by_name = {run["name"]: run for run in result["runs"]}
    assert by_name["001-estimator-mc_seed-1"]["resumed_at_epoch"] == 1  # not from scratch
    assert by_name["000-estimator-mc_seed-0"]["resumed_at_epoch"] is None
    assert _stable(result["runs"]) == _stable(serial_sweep["runs"])


def _refuses(spec: dict) -> dict:
    raise UserInputError(f"run {spec['name']} refuses")


def test_a_run_that_fails_on_ray_fails_the_sweep_with_its_own_line(ray_cluster, tmp_path):
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with RayExecutor(max_retries=0) as executor:
        with pytest.raises(UserInputError, match=r"^run 000-estimator-mc_seed-0 refuses$"):
            run_sweep(expand_grid(GRID)[:1], tmp_path, executor, log=None, run_function=_refuses)
    assert not (tmp_path / "sweep.json").exists()


def _tiny_compare(out: Path, *flags: str) -> list[str]:
    return ["compare", "--estimators", "mc,analytic", *TINY_COMPARE, "--repeats", "2",
            "--out", str(out), *flags]  # fmt: skip


def test_compare_on_ray_equals_serial(ray_cluster, tmp_path, capsys):
    assert main(_tiny_compare(tmp_path / "serial")) == 0
    assert main(_tiny_compare(tmp_path / "ray", "--executor", "ray")) == 0, capsys.readouterr()
    serial, ray = (
        json.loads((tmp_path / name / "comparison.json").read_text()) for name in ("serial", "ray")
    )
    assert len(ray["runs"]) == 4
    assert [(r["estimator"], r["seed"]) for r in ray["runs"]] == [
        ("mc", 0),
        ("analytic", 0),
        ("mc", 1),
        ("analytic", 1),
    ]
    for ray_run, serial_run in zip(ray["runs"], serial["runs"]):
        assert _stable(ray_run) == _stable(serial_run)
        assert Path(ray_run["run_dir"]).name == f"{ray_run['estimator']}-seed{ray_run['seed']}"
    tables = ("summary", "snr_versus_particles", "bounds_versus_particles")
    for key in (*tables, "paired_differences", "snr_slopes", "budget"):
        assert _stable(ray[key]) == _stable(serial[key]), key
    assert ray["paired_differences"] and ray["snr_slopes"]  # (not equal by being empty)
    # the same files, tables and plots
    assert (tmp_path / "ray" / "comparison.csv").exists()
    assert (tmp_path / "ray" / "plots" / "learning_curves.png").exists()


def test_reproduce_on_ray_trains_each_cell_as_the_serial_command_does(ray_cluster, tmp_path):
    """Two tiny cells of the IWAE table as Ray tasks: each cell's folder holds the
    parameters (the checkpoint's) and the evaluation of the serial command's."""
    argv = ["reproduce", "iwae-table1", "--dataset", "digits", "--limit", "100", "--epochs", "1",
            "--eval-samples", "25", "--eval-images", "20", "--cells", "1l-vae-k1,1l-iwae-k5",
            "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "serial")]) == 0
    assert main([*argv, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    for cell in ("1l-vae-k1", "1l-iwae-k5"):
        serial, ray = (
            load_checkpoint(tmp_path / side / cell / "checkpoint.pt") for side in ("serial", "ray")
        )
        for name, value in serial["model"].items():
            assert torch.equal(ray["model"][name], value), (cell, name)
        evaluations = [
            json.loads((tmp_path / side / cell / "evaluation.json").read_text())
            for side in ("serial", "ray")
        ]
        assert evaluations[0]["test_log_likelihood"] == evaluations[1]["test_log_likelihood"]
    table = json.loads((tmp_path / "ray" / "iwae-table1.json").read_text())
    assert [row["cell"] for row in table["rows"]] == ["1l-vae-k1", "1l-iwae-k5"]


@pytest.mark.parametrize(
    "grid,message",
    [
        ([1, 2], "must be a JSON object"),
        ({"grid": {}}, "grid is empty"),
        ({"grid": {"train.estimatr": ["mc"]}}, "grid key 'train.estimatr' is not section.key"),
        ({"grid": {"seed": [0]}}, "grid key 'seed' is not section.key"),
        ({"grid": {"train.seed": []}}, "needs a non-empty list"),
        ({"grid": {"train.seed": 3}}, "needs a non-empty list"),
        ({"grid": {"train.estimator": ["mc", "elbo3"]}}, "run 001-estimator-elbo3"),
        ({"grid": {"train.seed": [0, 0]}}, "have the same config"),
        ({"grid": {"train.seed": [0]}, "extra": 1}, "unknown key(s) extra"),
        ({"base": {"trian": {}}, "grid": {"train.seed": [0]}}, "unknown section(s) trian"),
        ({"grid": {"data.limit": [-5]}}, "limit must be an integer >= 1"),
    ],
)
def test_a_bad_grid_is_refused_before_anything_is_written(grid, message, tmp_path, capsys):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    code = main(["sweep", "--grid", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_sweep_and_executor_flags_are_checked(grid_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = ["sweep", "--grid", str(grid_file), "--out", str(out)]
    for flags, message in [
        (["--ray-address", "auto"], "--ray-address needs --executor ray"),
        (["--cpus-per-run", "0"], "--cpus-per-run must be >= 1"),
        (["--resume"], "holds no sweep to resume"),
    ]:
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main([*base, "--executor", "ray"]) == 2
    assert "pip install 'pyro-vae[ray]'" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(UserInputError, match="unknown executor"):
        make_executor("dask")
    assert SerialExecutor(threads=1).map(abs, [-1, 2]) == [1, 2]
