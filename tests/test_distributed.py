"""Data-parallel training under torch.distributed, on CPU with the gloo backend and two
processes: the averaged gradient, identical parameters on every rank after every step,
one writer, torchrun end to end (against one process), resume and elastic restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pyro_vae.training.checkpoint import load_checkpoint

from .conftest import REPO

WORLD = 2
#: a small model on the built-in digits: a few seconds per run
TINY = ["--dataset", "digits", "--latent-dims", "4", "--hidden", "32", "--quiet"]


def _spawn(worker, tmp_path: Path, *args) -> list:
    """Run ``worker(rank, ...)`` in WORLD processes joined by a gloo group; return what
    each rank put in its result file."""
    init = tmp_path / "init"
    mp.spawn(_entry, args=(worker, str(init), str(tmp_path), args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(WORLD)]


def _entry(rank, worker, init, folder, args):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD
    )
    try:
        result = worker(rank, Path(folder), *args)
        torch.save(result, Path(folder) / f"result{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _vae():
    from pyro_vae import ModelConfig, build_vae

    torch.manual_seed(0)  # the same initial parameters in every process
    return build_vae(ModelConfig(latent_dims=(3,), hidden=(16,)), (1, 8, 8))


# ------------------------------------------------------------------ one step
def _averaged_gradient(rank, folder):
    import pyro

    from pyro_vae import distributed, make_elbo
    from pyro_vae.models.protocol import scaled

    vae = _vae()
    batch = (torch.rand(10, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    part = batch[distributed.shard(len(batch))]
    pyro.set_rng_seed(100 + rank)  # each rank its own noise
    elbo = make_elbo("mc", 2)
    scale = 500 * WORLD / len(batch)
    loss = elbo.differentiable_loss(scaled(vae.model, scale), scaled(vae.guide, scale), part)
    loss.backward()
    own = {name: p.grad.clone() for name, p in vae.named_parameters()}
    params = list(vae.parameters())
    mean_loss = distributed.average_step(float(loss), params, list(vae.buffers()))
    return {
        "own": own,
        "own_loss": float(loss),
        "averaged": {name: p.grad.clone() for name, p in vae.named_parameters()},
        "mean_loss": mean_loss,
    }


def test_one_step_averaged_gradient_equals_the_mean_of_the_per_rank_gradients(tmp_path):
    results = _spawn(_averaged_gradient, tmp_path)
    for name, grad in results[0]["averaged"].items():
        expected = (results[0]["own"][name] + results[1]["own"][name]) / 2
        assert torch.equal(grad, expected), name
        assert torch.equal(grad, results[1]["averaged"][name])
        # the ranks' noise differs, so their own gradients do
        assert not torch.equal(results[0]["own"][name], results[1]["own"][name])
    expected_loss = (results[0]["own_loss"] + results[1]["own_loss"]) / 2
    # (the loss travels in the gradients' float32: one rounding of the sum)
    assert results[0]["mean_loss"] == pytest.approx(expected_loss, rel=1e-6)


# ------------------------------------------------------------------ whole runs in-process
def _fit_checking_every_step(rank, folder, compile_):
    import pyro_vae.io as io_module
    import pyro_vae.training.checkpoint as checkpoint_module
    from pyro_vae import distributed, fit, load_data
    from pyro_vae.config import TrainConfig
    from pyro_vae.training.guard import FiniteGuard

    writes: list[str] = []
    real = io_module.atomic_write_bytes

    def recorded(data, path):
        writes.append(Path(path).name)
        real(data, path)

    io_module.atomic_write_bytes = recorded
    checkpoint_module.atomic_write_bytes = recorded
    fingerprints = []
    check = FiniteGuard.check_step

    def checked(self, loss, grad_max):
        # before each step: the parameters every rank holds (the state after the last)
        state = torch.cat([p.detach().reshape(-1) for p in self.parameters])
        same = distributed.gather_objects(state)
        fingerprints.append(all(torch.equal(same[0], other) for other in same))
        check(self, loss, grad_max)

    FiniteGuard.check_step = checked
    data = load_data("digits", binarize="dynamic")
    vae = _vae()
    config = TrainConfig(epochs=2, batch_size=128, compile=compile_, monitor_images=200)
    history = fit(vae, data, config, run_dir=folder / "run", progress=False, log=None)
    final = torch.cat([p.detach().reshape(-1) for p in vae.parameters()])
    buffers = torch.cat([b.detach().reshape(-1).double() for b in vae.buffers()])
    return {
        "steps_identical": fingerprints,
        "final": final,
        "buffers": buffers,
        "writes": writes,
        "history": history.epochs,
    }


@pytest.mark.parametrize("compile_", [True, False], ids=["captured", "eager"])
def test_ranks_hold_identical_parameters_after_every_step_and_only_rank_0_writes(
    tmp_path, compile_
):
    results = _spawn(_fit_checking_every_step, tmp_path, compile_)
    steps = results[0]["steps_identical"]
    assert len(steps) == 2 * 12 and all(steps)  # 1,500 digits / 128: 12 steps an epoch
    assert torch.equal(results[0]["final"], results[1]["final"])
    assert torch.equal(results[0]["buffers"], results[1]["buffers"])
    assert results[1]["writes"] == []
    assert {"checkpoint.pt", "metrics.jsonl", "config.json"} <= set(results[0]["writes"])
    # the sharded evaluation gave every rank the same numbers
    timing = ("seconds", "eval_seconds")
    for mine, theirs in zip(results[0]["history"], results[1]["history"]):
        assert {k: v for k, v in mine.items() if k not in timing} == {
            k: v for k, v in theirs.items() if k not in timing
        }
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert len(saved["rng_ranks"]) == WORLD


# ------------------------------------------------------------------ torchrun end to end
def _torchrun(args: list[str], nproc: int = WORLD, extra: list[str] | None = None, **kwargs):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *(extra or []),
        "-m",
        "pyro_vae",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs
    )


def _final(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_two_processes_under_torchrun_train_like_one(tmp_path):
    """The same seed in one process and in two: the same initial parameters and data
    order, the noise of another stream. Seeds 0, 1, 2 of this run in one process end at
    test ELBO -39.50, -39.64, -37.54 (a spread of about 1 nat, standard deviation 1.1);
    the two-process run must land well inside it: within 0.5 nats of the one-process run
    of its seed (it was 0.002 apart when measured)."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    args = [*TINY, "--epochs", "3", "--eval-samples", "50"]
    single = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "train", *args, "--out", str(one)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    process = _torchrun(["train", *args, "--out", str(two)])
    output = process.communicate(timeout=300)[0].decode()
    assert process.returncode == 0, output
    assert abs(_final(two)["test_elbo"] - _final(one)["test_elbo"]) < 0.5
    evaluation = json.loads((two / "evaluation.json").read_text())
    assert evaluation["points"] == 297  # the sharded log p(x) gathered every test image
    assert output.count("run folder:") == 1  # one process speaks
    saved = json.loads((two / "config.json").read_text())
    assert saved["train"]["batch_size"] == 128  # the global batch


def _worker_pids(parent: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint_and_the_run_completes(
    tmp_path,
):
    """SIGKILL of one worker mid-run: torchrun (--max-restarts 1) restarts both, which
    resume from the last checkpoint; the run completes, and its parameters equal those
    of the same run never interrupted (every rank's RNG state is in the checkpoint)."""
    args = [*TINY, "--epochs", "6", "--eval-samples", "0", "--batch-size", "32"]
    whole = _torchrun(["train", *args, "--out", str(tmp_path / "whole")])
    log = whole.communicate(timeout=300)[0].decode()
    assert whole.returncode == 0, log
    run = tmp_path / "killed"
    process = _torchrun(["train", *args, "--out", str(run)], extra=["--max-restarts=1"])
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    workers = _worker_pids(process.pid)
    assert len(workers) == WORLD
    os.kill(workers[-1], signal.SIGKILL)
    output = process.communicate(timeout=300)[0].decode()
    assert process.returncode == 0, output
    epochs = [
        json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert (run / "report.md").exists()
    a = load_checkpoint(run / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def test_nproc_launches_torchrun_and_bad_counts_are_refused(tmp_path, capsys):
    from .helpers import run_cli

    code, _, err = run_cli(["train", *TINY, "--nproc", "0", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--nproc must be >= 1" in err
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyro_vae",
            "train",
            *TINY,
            "--epochs",
            "1",
            "--eval-samples",
            "0",
            "--nproc",
            "2",
            "--out",
            str(tmp_path / "r"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(load_checkpoint(tmp_path / "r" / "checkpoint.pt")["rng_ranks"]) == 2
