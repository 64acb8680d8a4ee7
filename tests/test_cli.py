"""The command line end to end: every command, every bad input, and SIGKILL mid-training."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_vae.app.cli import main
from pyro_vae.training.checkpoint import load_checkpoint

from .helpers import TINY_RUN, digest, run_cli

TINY = TINY_RUN


def is_png(path: Path) -> bool:
    return (
        path.is_file()
        and path.stat().st_size > 1000
        and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *TINY, "--epochs", "3", "--eval-samples", "30", "--out", str(out)]) == 0
    return out


def test_train_writes_a_complete_run_folder(finished_run):
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "evaluation.json", "report.md"):
        assert (finished_run / name).is_file(), name
    for name in ("learning_curves", "reconstructions", "samples", "latent"):
        assert is_png(finished_run / "plots" / f"{name}.png"), name
    config = json.loads((finished_run / "config.json").read_text())
    assert config["model"]["latent_dims"] == [3] and config["data"]["dataset"] == "digits"
    records = [
        json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for key in ("train_elbo", "test_elbo", "test_expected_log_likelihood", "test_kl", "seconds"):
        assert all(key in r for r in records)
    report = (finished_run / "report.md").read_text()
    assert "pyro-vae train --dataset digits" in report and "plots/learning_curves.png" in report
    assert "K=30" in report


def test_evaluate_json(finished_run, capsys):
    code, out, _ = run_cli(["evaluate", finished_run, "--samples", "40", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    for key in (
        "test_elbo",
        "test_log_likelihood",
        "test_nll",
        "kl",
        "active_units",
        "khat_max",
        "khat_share_above_0.7",
    ):
        assert key in result
    assert result["test_nll"] > 0 and result["importance_samples"] == 40
    code, out, _ = run_cli(["evaluate", finished_run, "--samples", "10"], capsys)
    assert code == 0 and "test log p(x), K=10" in out


def test_evaluate_compiles_on_request_and_not_by_default_for_small_work(
    finished_run, capsys, monkeypatch
):
    from pyro_vae.analysis import evaluation

    seen = []
    original = evaluation.CompiledFunction

    def spy(function, owner, enabled=True, **kwargs):
        compiled = original(function, owner, enabled, **kwargs)
        seen.append(compiled)
        return compiled

    monkeypatch.setattr(evaluation, "CompiledFunction", spy)
    for flags, expected in (([], False), (["--compile"], True), (["--no-compile"], False)):
        code, out, _ = run_cli(["evaluate", finished_run, "--samples", "20", *flags], capsys)
        assert code == 0 and seen[-1].enabled is expected, (flags, seen[-1].enabled)


@pytest.mark.parametrize("command", ["compare", "diagnose"])
def test_compare_and_diagnose_take_the_compile_switch(command):
    from pyro_vae.app.cli import build_parser

    args = build_parser().parse_args(
        [command, *(["run"] if command == "diagnose" else []), "--no-compile"]
    )
    assert args.compile is False


def test_sample_writes_a_png(finished_run, capsys, tmp_path):
    code, _, _ = run_cli(["sample", finished_run, "--n", "16", "--out", tmp_path / "s.png"], capsys)
    assert code == 0 and is_png(tmp_path / "s.png")


def test_resume_extends_a_finished_run(finished_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    code, out, _ = run_cli(
        ["train", "--resume", "--epochs", "4", "--eval-samples", "0", "--out", copy, "--quiet"],
        capsys,
    )
    assert code == 0
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 4


def test_help_and_version_are_fast_and_need_no_torch():
    code = (
        "import sys, pyro_vae.app.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'pyro' not in sys.modules, 'heavy import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in (["train", "--help"], ["evaluate", "--help"], ["sample", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 0
    version = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("pyro-vae ")


# --------------------------------------------------------------------- bad input
def _expect_refusal(argv, capsys, message, watched: Path | None = None):
    before = digest(watched) if watched else None
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (code, out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and message in err, err
    if watched is not None:
        assert digest(watched) == before


def _argparse_refusal(argv, capsys, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["--epochs", "ten"], "invalid int value: 'ten'"),
        (["--latent-dims", "a,b"], "expected integers separated by commas"),
    ],
)
def test_unknown_choices_are_one_line_errors(flags, message, capsys, tmp_path):
    _argparse_refusal(["train", *flags, "--out", tmp_path / "r"], capsys, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--estimator", "elbo2"], "unknown estimator 'elbo2': choose one of mc, analytic"),
        (["--estimator", "nosuchpkg.mod:ELBO"], "module 'nosuchpkg' is not importable"),
        (["--estimator", "pyro.infer:NoSuchELBO"], "pyro.infer has no 'NoSuchELBO'"),
        (["--estimator", "renyi", "--alpha", "1"], "alpha = 1 is the ELBO"),
        (["--estimator", "mc", "--estimator-option", "alpha=0.3"], "mc has no option 'alpha'"),
        (["--estimator", "renyi", "--estimator-option", "alpha=x"], "must be a float, got 'x'"),
        (["--estimator", "renyi", "--estimator-option", "alpha"], "is not NAME=VALUE"),
        (["--model", "nosuchpkg.models:make"], "module 'nosuchpkg' is not importable"),
        (["--model", "pyro_vae:nope"], "pyro_vae has no 'nope'"),
    ],
)
def test_unknown_estimators_and_models_are_one_line_errors(flags, message, capsys, tmp_path):
    _expect_refusal(["train", *flags, "--out", tmp_path / "r"], capsys, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--epochs", "0"], "epochs must be an integer >= 1"),
        (["--epochs", "-4"], "epochs must be an integer >= 1"),
        (["--batch-size", "0"], "batch-size must be an integer >= 1"),
        (["--lr", "0"], "learning rate must be > 0"),
        (["--lr", "-0.1"], "learning rate must be > 0"),
        (["--particles", "0"], "particles must be an integer >= 1"),
        (["--limit", "0"], "limit must be an integer >= 1"),
        (["--early-stopping", "3"], "early stopping needs a validation set"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--eval-samples", "-1"], "eval_samples must be an integer >= 0"),
    ],
)
def test_bad_option_values(flags, message, capsys, tmp_path):
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _expect_refusal(["train", *TINY, *flags, "--out", tmp_path / "r"], capsys, message)
    assert not (tmp_path / "r").exists()


def test_missing_data_folder(capsys, tmp_path):
    _expect_refusal(
        ["train", "--dataset", "mnist", "--data-dir", tmp_path / "none", "--out", tmp_path / "r"],
        capsys,
        "does not exist: pass --data-dir",
    )


@pytest.fixture
def mnist_copy(mnist_dir, tmp_path) -> Path:
    folder = tmp_path / "mnist"
    shutil.copytree(mnist_dir, folder)
    return folder


def test_truncated_idx_file(mnist_copy, capsys, tmp_path):
    path = mnist_copy / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    _expect_refusal(
        ["train", "--dataset", "mnist", "--data-dir", mnist_copy, "--out", tmp_path / "r"],
        capsys,
        "is corrupt or truncated",
    )


def test_checksum_mismatch(mnist_copy, capsys, tmp_path):
    gz = mnist_copy / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(gz.read_bytes()))
    content[-1] = (content[-1] + 1) % 10
    gz.write_bytes(gzip.compress(bytes(content)))
    _expect_refusal(
        ["train", "--dataset", "mnist", "--data-dir", mnist_copy, "--out", tmp_path / "r"],
        capsys,
        "checksum mismatch",
    )


def test_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    _expect_refusal(["train", *TINY, "--out", target], capsys, "is a file")
    assert target.read_text() == "keep me"


def test_finished_run_is_not_overwritten(finished_run, capsys):
    _expect_refusal(
        ["train", *TINY, "--out", finished_run],
        capsys,
        "holds a finished run: pass --overwrite",
        watched=finished_run,
    )


def test_non_empty_folder_is_not_overwritten(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _expect_refusal(["train", *TINY, "--out", tmp_path], capsys, "is not empty", watched=tmp_path)


def test_resume_without_a_checkpoint(capsys, tmp_path):
    _expect_refusal(["train", "--resume", "--out", tmp_path], capsys, "holds no run to resume")


def test_resume_with_a_corrupt_checkpoint(finished_run, capsys, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    checkpoint = copy / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:3000])
    _expect_refusal(
        ["train", "--resume", "--epochs", "5", "--out", copy],
        capsys,
        "is corrupt or not a pyro-vae checkpoint",
        watched=copy,
    )
    _expect_refusal(["evaluate", copy], capsys, "is corrupt", watched=copy)


def test_resume_refuses_changed_options(finished_run, capsys):
    _expect_refusal(
        ["train", "--resume", "--lr", "0.1", "--out", finished_run],
        capsys,
        "--lr: saved 0.001, given 0.1",
        watched=finished_run,
    )


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"train": {"epochs": 2, "learning_rate": 0.1}}', "unknown key(s) learning_rate"),
        ('{"optim": {}}', "unknown section(s) optim"),
        ('{"train": {"estimator": "foo"}}', "unknown estimator 'foo'"),
        ("epochs: 3", "is not valid JSON"),
        ('{"model": {"latent_dims": ["a"]}}', "latent dims must be an integer"),
        ('{"model": {"latent_dims": [2.7]}}', "latent dims must be an integer"),
        ('{"data": {"limit": 2.5}}', "limit must be an integer"),
        ('{"model": {"prior_loc": "x"}}', "prior_loc must be a finite number"),
        ('{"train": {"estimator": "renyi", "alpha": "x"}}', "renyi's option alpha must be a float"),
        ('{"train": {"lr": Infinity}}', "learning rate must be a finite number"),
        ('{"train": {"kl_warmup_epochs": NaN}}', "kl_warmup_epochs must be a finite number"),
        ('{"data": {"data_dir": 5}}', "data_dir must be a folder name"),
        ('{"train": {"compile": "yes"}}', "compile must be true, false or"),
    ],
)
def test_bad_config_files(content, message, capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(content)
    _expect_refusal(["train", "--config", config, "--out", tmp_path / "r"], capsys, message)
    assert not (tmp_path / "r").exists()


def test_config_file_then_flags(capsys, tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"model": {"latent_dims": [2], "hidden": [8]}, "train": {"epochs": 1}}')
    code, _, _ = run_cli(
        [
            "train",
            "--config",
            config,
            "--limit",
            "100",
            "--epochs",
            "2",
            "--no-compile",
            "--eval-samples",
            "0",
            "--quiet",
            "--out",
            tmp_path / "r",
        ],
        capsys,
    )
    assert code == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["model"]["latent_dims"] == [2] and saved["train"]["epochs"] == 2
    assert saved["train"]["compile"] is False


@pytest.mark.parametrize(
    "argv,message",
    [
        (["evaluate", "{tmp}/nowhere"], "does not exist"),
        (["evaluate", "{tmp}"], "has no config.json"),
        (["evaluate", "{run}", "--samples", "0"], "--samples must be >= 1"),
        (["sample", "{run}", "--n", "0"], "--n must be >= 1"),
        (["sample", "{run}", "--out", "{tmp}/x.jpg"], "must end in .png"),
    ],
)
def test_bad_evaluate_and_sample_input(argv, message, capsys, tmp_path, finished_run):
    argv = [a.format(tmp=tmp_path, run=finished_run) for a in argv]
    _expect_refusal(argv, capsys, message, watched=finished_run)


# --------------------------------------------------------------------- crashes
EPOCHS = 150


def _train_process(out: Path, log: Path, resume: bool = False) -> subprocess.Popen:
    flags = ["--resume"] if resume else [*TINY, "--epochs", str(EPOCHS), "--eval-samples", "0"]
    argv = [sys.executable, "-m", "pyro_vae", "train", *flags, "--quiet", "--out", str(out)]
    with open(log, "ab") as handle:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=handle)


def _mtime(path: Path) -> float:
    return path.stat().st_mtime_ns if path.exists() else 0


def test_sigkill_at_random_moments_then_resume_finishes_the_same_run(tmp_path):
    log = tmp_path / "stderr.log"
    reference = tmp_path / "reference"
    assert _train_process(reference, log).wait(timeout=300) == 0, log.read_text()
    killed = tmp_path / "killed"
    checkpoint = killed / "checkpoint.pt"
    rng = random.Random(20241121)
    epochs_at_kill = []
    for attempt in range(4):
        before = _mtime(checkpoint)
        process = _train_process(killed, log, resume=attempt > 0)
        deadline = time.time() + 120
        while _mtime(checkpoint) == before and process.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 1.0))  # now it is training: kill at a random moment
        assert process.poll() is None, "finished before the kill: make the run longer"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        # whatever the moment, the checkpoint on disk is complete and loads
        state = load_checkpoint(checkpoint)
        assert all(torch.isfinite(t).all() for t in state["model"].values())
        epochs_at_kill.append(state["epoch"])
    assert epochs_at_kill == sorted(epochs_at_kill) and epochs_at_kill[-1] < EPOCHS
    finish = _train_process(killed, log, resume=True)
    assert finish.wait(timeout=300) == 0, log.read_text()
    final, expected = load_checkpoint(checkpoint), load_checkpoint(reference / "checkpoint.pt")
    assert final["epoch"] == expected["epoch"] == EPOCHS
    for name, value in expected["model"].items():
        assert torch.equal(final["model"][name], value), name
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, EPOCHS + 1))


# --------------------------------------------------------------------- MNIST
def test_mnist_train_evaluate_sample(mnist_dir, tmp_path, capsys):
    out = tmp_path / "mnist"
    code, stdout, _ = run_cli(
        [
            "train",
            "--dataset",
            "mnist",
            "--data-dir",
            mnist_dir,
            "--limit",
            "1000",
            "--epochs",
            "1",
            "--eval-samples",
            "20",
            "--quiet",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0 and "test log p(x), K=20" in stdout
    code, stdout, _ = run_cli(["evaluate", out, "--samples", "10", "--json", "--quiet"], capsys)
    assert code == 0 and json.loads(stdout)["points"] == 1000
    code, _, _ = run_cli(["sample", out, "--n", "9"], capsys)
    assert code == 0 and is_png(out / "plots" / "samples-9.png")


# --------------------------------------------------------------------- review fixes
def test_resume_and_overwrite_together_are_refused(finished_run, capsys):
    _expect_refusal(
        ["train", "--resume", "--overwrite", "--out", finished_run],
        capsys,
        "pass one of them",
        watched=finished_run,
    )


def test_bad_seed_with_overwrite_keeps_the_old_run(finished_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    for seed in ("-1", str(2**32)):
        _expect_refusal(
            ["train", *TINY, "--seed", seed, "--overwrite", "--out", copy],
            capsys,
            "seed must be an integer in [0, 4294967295]",
            watched=copy,
        )


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "mine.png").write_bytes(b"not yours")
    (tmp_path / "report.md").write_text("my notes")
    _expect_refusal(
        ["train", *TINY, "--overwrite", "--out", tmp_path],
        capsys,
        "is not a pyro-vae run folder",
        watched=tmp_path,
    )


def test_out_under_a_file_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _expect_refusal(
        ["train", *TINY, "--eval-samples", "0", "--out", blocker / "sub"],
        capsys,
        "check the paths and permissions",
    )
