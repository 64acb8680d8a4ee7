"""Issue #27: preemption, run folders nothing writes through, checked records, inputs.

Each test is one numbered case of the issue (a reproduced failure), run as a cluster
or a hostile user would: the promised outcome, or one line with its exit status and
nothing lost or changed. Both legs of every bit-for-bit comparison run in this process
(the same torch thread count: float32 reductions differ with it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_vae.app.cli import main
from pyro_vae.training import preemption
from pyro_vae.training.checkpoint import load_checkpoint
from pyro_vae.training.step import Step
from pyro_vae.training.trainer import Trainer

from .helpers import TINY_RUN, digest, refused, run_cli

#: 200 training digits in batches of 20: 10 steps per epoch (the IWAE protocol's batch)
RUN = [*TINY_RUN, "--batch-size", "20", "--monitor-images", "20", "--eval-samples", "20"]
EPOCHS = ["--epochs", "3"]


def _numbers(run: Path) -> list[dict]:
    """metrics.jsonl without its timings (the only fields a resume may change)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in lines]


def assert_same_run(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert first["step"] == second["step"] and first["epoch"] == second["epoch"]
    for name, value in first["model"].items():
        assert torch.equal(value, second["model"][name]), name
    assert _numbers(a) == _numbers(b)
    for key in ("test_log_likelihood", "test_elbo"):
        assert (
            json.loads((a / "evaluation.json").read_text())[key]
            == json.loads((b / "evaluation.json").read_text())[key]
        )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *RUN, *EPOCHS, "--out", str(out)]) == 0
    return out


def _signal_at_step(monkeypatch, step: int, number: int = signal.SIGTERM) -> None:
    """Deliver ``number`` to this process while step ``step`` (1-based, counted over the
    command) computes its loss: the step in progress, as a scheduler's signal finds it."""
    calls = {"n": 0}
    original = Step.loss_and_grads

    def loss_and_grads(self, batch, scale):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), number)
        return original(self, batch, scale)

    monkeypatch.setattr(Step, "loss_and_grads", loss_and_grads)


# ---------------------------------------------------------------------- 2. SIGTERM, SIGUSR1
@pytest.mark.parametrize(
    ("step", "number"),
    [(3, signal.SIGTERM), (13, signal.SIGUSR1), (20, signal.SIGTERM), (24, signal.SIGTERM)],
)
def test_2_a_signal_finishes_the_step_checkpoints_mid_epoch_and_the_resume_is_bit_identical(
    step, number, uninterrupted, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    _signal_at_step(monkeypatch, step, number)
    code, _, err = run_cli(["train", *RUN, *EPOCHS, "--resume", "auto", "--out", out], capsys)
    assert code == 128 + number, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"stopped by {signal.Signals(number).name}" in err and "--resume auto" in err
    assert not (out / ".lock").exists()
    saved = load_checkpoint(out / "checkpoint.pt")
    # the step in progress was finished and kept; none after it was taken
    assert saved["step"] == step
    steps_per_epoch = 10
    if step % steps_per_epoch:
        assert saved["position"]["steps"] == step % steps_per_epoch
        assert f"after step {step % steps_per_epoch} of 10" in err
    else:  # the signal came in an epoch's last step: an ordinary epoch checkpoint
        assert saved["position"] is None
    # the handlers are gone with the command: a signal now would end the process as usual
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.undo()
    code, _, err = run_cli(["train", *RUN, *EPOCHS, "--resume", "auto", "--out", out], capsys)
    assert code == 0, err
    assert_same_run(uninterrupted, out)


def test_2_a_signal_in_the_first_epoch_of_a_library_fit_raises_preempted_and_resumes(
    tmp_path, monkeypatch
):
    from pyro_vae import TrainConfig, build_vae, fit, load_data
    from pyro_vae.config import ModelConfig
    from pyro_vae.errors import Preempted

    def run(folder: Path, resume: bool = False):
        data = load_data("digits", limit=200)
        torch.manual_seed(0)
        vae = build_vae(ModelConfig(latent_dims=(3,), hidden=(16,)), data.data_shape)
        config = TrainConfig(epochs=2, batch_size=20, monitor_images=20, compile=False)
        fit(vae, data, config, run_dir=folder, resume=resume, progress=False, log=None)
        return vae

    reference = run(tmp_path / "reference")
    _signal_at_step(monkeypatch, 4)
    with pytest.raises(Preempted) as stopped:
        run(tmp_path / "run")
    assert stopped.value.status == 143 and "`resume`" in str(stopped.value)
    assert "--" not in str(stopped.value)  # library language
    monkeypatch.undo()
    resumed = run(tmp_path / "run", resume=True)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_2_without_a_run_folder_fit_leaves_the_signals_alone(monkeypatch):
    from pyro_vae import TrainConfig, build_vae, fit, load_data
    from pyro_vae.config import ModelConfig

    seen = []
    original = Trainer.train_epoch

    def train_epoch(self, progress=True):
        seen.append(signal.getsignal(signal.SIGTERM))
        return original(self, progress)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    data = load_data("digits", limit=100)
    vae = build_vae(ModelConfig(latent_dims=(2,), hidden=(8,)), data.data_shape)
    fit(vae, data, TrainConfig(epochs=1, monitor_images=10), progress=False, log=None)
    assert seen == [signal.SIG_DFL]
    assert preemption.requested() is None


# ---------------------------------------------------------------------- 1. before the checkpoint
def test_1_a_folder_stopped_before_its_first_checkpoint_is_started_by_the_same_command(
    uninterrupted, tmp_path, capsys
):
    """SIGTERM between config.json and the first checkpoint left .lock and config.json:
    the requeued command (--resume auto) starts the run over, since nothing was trained."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(uninterrupted / "config.json", out / "config.json")
    (out / ".lock").write_text("PID 1: pyro-vae train")
    command = ["train", *RUN, *EPOCHS, "--resume", "auto", "--out", out]
    code, _, err = run_cli(command, capsys)
    assert code == 0, err
    assert_same_run(uninterrupted, out)
    # --resume (always) still says why there is nothing to continue
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(uninterrupted / "config.json", other / "config.json")
    refused(["train", "--resume", "--out", other], capsys, "no checkpoint.pt: the run stopped")
    # a folder with a config.json and files of the user's is still not ours to start over
    (other / "notes.txt").write_text("mine")
    refused([*command[:-1], other], capsys, "is not empty", watched=other)


# ---------------------------------------------------------------------- 3-6. links, others' files
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert (
        main(["train", *TINY_RUN, "--epochs", "1", "--eval-samples", "20", "--out", str(out)]) == 0
    )
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    return copy


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A folder of the user's, outside every run folder, with a file in it."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "v").write_text("the user's file")
    (folder / "samples.png").write_text("the user's picture")
    return folder


@pytest.mark.parametrize("resume", ["always", "auto"])
def test_3_a_lock_that_is_a_link_is_refused_and_its_target_kept(
    resume, run_copy, elsewhere, capsys
):
    (run_copy / ".lock").symlink_to(elsewhere / "v")
    argv = ["train", *TINY_RUN, "--epochs", "2", f"--resume={resume}", "--out", run_copy]
    refused(argv, capsys, ".lock is a symbolic link", watched=elsewhere)
    assert (run_copy / ".lock").is_symlink()  # (the user's link is left as it was, too)


def test_4_a_plots_folder_that_is_a_link_is_refused_by_train_and_sample(
    run_copy, elsewhere, capsys
):
    shutil.rmtree(run_copy / "plots")
    (run_copy / "plots").symlink_to(elsewhere, target_is_directory=True)
    train = ["train", *TINY_RUN, "--epochs", "2", "--resume", "--out", run_copy]
    for argv in (train, ["sample", run_copy, "--n", "4"]):
        before = digest(run_copy)
        refused(argv, capsys, "plots is a symbolic link", watched=elsewhere)
        assert digest(run_copy) == before  # (refused before training: nothing written)


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.jsonl", "config.json", "report.md"])
def test_4_a_run_file_that_is_a_link_is_refused_before_anything_is_written(
    name, run_copy, elsewhere, capsys
):
    (run_copy / name).unlink()
    (run_copy / name).symlink_to(elsewhere / "v")
    argv = ["train", *TINY_RUN, "--epochs", "2", "--resume", "auto", "--out", run_copy]
    refused(argv, capsys, f"{name} is a symbolic link", watched=elsewhere)


def test_4_writes_below_a_confined_folder_never_follow_a_link(tmp_path, elsewhere):
    from pyro_vae.io import LinkError, atomic_write_text, confined

    run = tmp_path / "run"
    (run / "deep").mkdir(parents=True)
    (run / "deep" / "plots").symlink_to(elsewhere, target_is_directory=True)
    with confined(run), pytest.raises(LinkError, match="plots is a symbolic link"):
        atomic_write_text("x", run / "deep" / "plots" / "v")
    (run / "file").symlink_to(elsewhere / "v")
    with pytest.raises(LinkError, match="file is a symbolic link"):  # (confined or not)
        atomic_write_text("x", run / "file")
    assert (elsewhere / "v").read_text() == "the user's file"


def test_5_sample_never_replaces_a_file_the_user_names_without_overwrite(
    finished, elsewhere, capsys
):
    target = elsewhere / "samples.png"
    refused(
        ["sample", finished, "--n", "4", "--out", target],
        capsys,
        "exists: pass --overwrite",
        watched=elsewhere,
    )
    code, _, err = run_cli(["sample", finished, "--n", "4", "--out", target, "--overwrite"], capsys)
    assert code == 0, err
    assert target.read_bytes().startswith(b"\x89PNG")
    link = elsewhere / "link.png"
    link.symlink_to(elsewhere / "v")
    refused(
        ["sample", finished, "--n", "4", "--out", link, "--overwrite"],
        capsys,
        "link.png is a symbolic link",
    )
    assert (elsewhere / "v").read_text() == "the user's file"


def test_6_diagnose_and_reproduce_never_write_into_another_run(finished, run_copy, capsys):
    refused(
        ["diagnose", finished, "--out", run_copy, "--images", "1", "--quiet"],
        capsys,
        "is the folder of another run",
        watched=run_copy,
    )
    refused(
        ["reproduce", "iwae-table1", "--out", run_copy, "--dataset", "digits", "--epochs", "1"],
        capsys,
        "holds a training run",
        watched=run_copy,
    )


# ---------------------------------------------------------------------- 7-8. records checked
def test_7_changed_training_data_are_refused_on_resume_and_evaluate_naming_both_digests(
    tmp_path, capsys
):
    import numpy as np

    values = np.random.default_rng(0).random((120, 16)).astype(np.float32)
    source = tmp_path / "a.npy"
    np.save(source, values)
    out = tmp_path / "run"
    argv = ["train", "--data", source, "--latent-dims", "2", "--hidden", "8", "--quiet"]
    code, _, err = run_cli([*argv, "--epochs", "1", "--eval-samples", "5", "--out", out], capsys)
    assert code == 0, err
    saved = load_checkpoint(out / "checkpoint.pt")["data_digest"]
    assert set(saved) == {"train", "validation", "test"}
    values[3, 4] = 0.5 if values[3, 4] != 0.5 else 0.25  # one value of one point
    np.save(source, values)
    for command in (
        [*argv, "--epochs", "2", "--resume", "--out", out],
        ["evaluate", out, "--samples", "5"],
    ):
        err = refused(command, capsys, "data differ from those the run was trained on", watched=out)
        assert err.count("SHA-256") == 1 and "in the run" in err and "now" in err


def _finished_copy(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    return copy


@pytest.mark.parametrize(
    "damage",
    ["truncated mid-line", "an extra NaN line", "a changed number", "a missing line"],
)
def test_8_a_damaged_metrics_jsonl_is_named_and_rewritten_from_the_checkpoint(
    damage, finished, tmp_path, capsys
):
    run = _finished_copy(finished, tmp_path)
    path = run / "metrics.jsonl"
    good = path.read_bytes()
    if damage == "truncated mid-line":
        path.write_bytes(good[: len(good) - 17])
    elif damage == "an extra NaN line":
        path.write_bytes(good + b'{"epoch": 2, "train_elbo": NaN}\n')
    elif damage == "a changed number":
        line = json.loads(good.decode().splitlines()[0])
        line["test_elbo"] += 1.0
        path.write_text(json.dumps(line) + "\n")
    else:
        path.write_bytes(b"")
    argv = ["train", *TINY_RUN, "--epochs", "1", "--eval-samples", "20", "--resume", "auto"]
    code, out, err = run_cli([*argv, "--out", run], capsys)
    assert code == 0, err
    assert "nothing to do" in out
    assert len(err.strip().splitlines()) == 1 and "metrics.jsonl was damaged" in err, err
    assert path.read_bytes() == good


def test_8_a_damaged_evaluation_is_evaluated_again_and_reproduce_reads_records_safely(
    finished, tmp_path, capsys
):
    from pyro_vae.app.reproduce import gather, select_cells
    from pyro_vae.errors import UserInputError

    run = _finished_copy(finished, tmp_path)
    evaluation = run / "evaluation.json"
    good = json.loads(evaluation.read_text())
    evaluation.write_text(evaluation.read_text()[:40])
    argv = ["train", *TINY_RUN, "--epochs", "1", "--eval-samples", "20", "--resume", "auto"]
    code, out, err = run_cli([*argv, "--out", run], capsys)
    assert code == 0, err
    assert "evaluated again" in err and "nothing to do" not in out
    assert json.loads(evaluation.read_text())["test_log_likelihood"] == good["test_log_likelihood"]
    # the table's reader: one line naming the cell, never a JSONDecodeError
    cell = select_cells("iwae-table1", "1l-vae-k1")[0]
    table = tmp_path / "table"
    shutil.copytree(run, table / cell.name)
    (table / cell.name / "metrics.jsonl").write_text('{"epoch": 1, "seconds"')
    with pytest.raises(UserInputError, match="records of cell 1l-vae-k1 .* are damaged"):
        gather([cell], table)


# ---------------------------------------------------------------------- 9. inputs
def _image_folder(tmp_path: Path, make) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(4):
        make(Image, folder / f"{index}.png", index)
    return folder


def test_9_a_png_whose_header_claims_30000_by_30000_is_refused_before_decoding(tmp_path, capsys):
    import struct
    import zlib

    def bomb(Image, path, index):
        if index:
            Image.new("L", (8, 8)).save(path)
            return
        # a valid PNG header claiming 30000x30000 grey pixels, with almost no data
        header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
        chunk = b"IHDR" + header
        ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        data = zlib.compress(b"\0" * 100)
        idat = struct.pack(">I", len(data)) + b"IDAT" + data
        idat += struct.pack(">I", zlib.crc32(b"IDAT" + data))
        end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + idat + end)

    folder = _image_folder(tmp_path, bomb)
    out = tmp_path / "run"
    err = refused(["train", "--data", folder, "--epochs", "1", "--out", out], capsys, "0.png")
    assert "decompression bomb" in err and "remove it" in err
    assert not out.exists()


def test_9_16_bit_images_are_scaled_by_their_bit_depth_not_clipped(tmp_path):
    import numpy as np

    from pyro_vae.data.files import read_images as _read_images

    def sixteen(Image, path, index):
        Image.fromarray(np.array([[60000, 1000], [0, 65535]], dtype=np.uint16)).save(path)

    levels = _read_images(_image_folder(tmp_path, sixteen))[0, 0]
    assert levels.flatten().tolist() == pytest.approx([60000 / 65535, 1000 / 65535, 0.0, 1.0])


def test_9_a_fifo_as_data_is_refused_without_opening_it(tmp_path, capsys):
    from pyro_vae import load_data
    from pyro_vae.errors import DataError

    fifo = tmp_path / "a.npy"
    os.mkfifo(fifo)  # (opening it for reading would wait for a writer for ever)
    refused(["train", "--data", fifo, "--epochs", "1", "--out", tmp_path / "r"], capsys, "pipe")
    with pytest.raises(DataError, match="not a regular file"):
        load_data(fifo)
    folder = tmp_path / "images"
    folder.mkdir()
    os.mkfifo(folder / "0.png")
    with pytest.raises(DataError, match="not a regular file"):
        load_data(folder)


def test_9_a_npy_header_claiming_more_than_the_file_holds_is_bad_input(tmp_path, capsys):
    import numpy as np

    path = tmp_path / "a.npy"
    np.save(path, np.zeros((4, 4), dtype=np.float32))
    raw = path.read_bytes()
    # the header now claims (10**7, 10**7) float32 points: 400 TB, in a 200-byte file
    path.write_bytes(raw.replace(b"(4, 4)", b"(10000000, 10000000)").ljust(200, b"\0")[:200])
    err = refused(
        ["train", "--data", path, "--epochs", "1", "--out", tmp_path / "r"], capsys, "header"
    )
    assert "out of memory" not in err and "truncated" in err


def test_9_a_config_with_a_duplicated_key_is_refused(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text('{"train": {"epochs": 1, "epochs": 100000000}}')
    argv = ["train", *TINY_RUN, "--config", config, "--out", tmp_path / "r"]
    refused(argv, capsys, "gives the key 'epochs' twice")


def test_9_python_arguments_of_the_wrong_type_are_one_line_user_errors(tmp_path):
    from pyro_vae import TrainConfig, build_vae, fit, load_data
    from pyro_vae.config import ModelConfig
    from pyro_vae.errors import UserInputError

    with pytest.raises(UserInputError, match="limit must be a whole number >= 1, got 2.5"):
        load_data("digits", limit=2.5)
    with pytest.raises(UserInputError, match="validation_size must be a whole number"):
        load_data("digits", validation_size="10")
    data = load_data("digits", limit=50)
    vae = build_vae(ModelConfig(latent_dims=(2,), hidden=(8,)), data.data_shape)
    file = tmp_path / "a_file"
    file.write_text("mine")
    with pytest.raises(UserInputError, match="is a file: pass a folder"):
        fit(vae, data, TrainConfig(epochs=1), run_dir=file, progress=False, log=None)
    assert file.read_text() == "mine"


# ---------------------------------------------------------------------- 10-11. distributed
REPO = Path(__file__).resolve().parents[1]
DIGITS_20 = ["--dataset", "digits", "--limit", "400", "--latent-dims", "3", "--hidden", "16"]
DIGITS_20 += ["--batch-size", "20", "--monitor-images", "20", "--quiet"]


def _pyro_vae(argv, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.update(kwargs.pop("env", {}))
    command = [sys.executable, "-m", "pyro_vae", *map(str, argv)]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _one_line(process: subprocess.Popen, status: int, message: str, timeout: float = 300) -> str:
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in err, err
    return err


def test_10_a_bad_option_under_nproc_is_one_line_with_exit_2(tmp_path):
    out = tmp_path / "run"
    process = _pyro_vae(["train", *DIGITS_20, "--lr", "-1", "--nproc", "2", "--out", out])
    _one_line(process, 2, "learning rate must be > 0")
    assert not out.exists()


def test_10_11_a_rank_killed_is_named_and_a_sigterm_resume_equals_the_whole_run(tmp_path):
    """Two processes: SIGKILL of rank 1 is one line naming it (exit 1); then SIGTERM to
    the launcher mid-epoch checkpoints and stops (143), and the same command resumes to
    the uninterrupted run's parameters, metrics (train_elbo included) and evaluation."""
    # 12 epochs: the signals come after the first and land in training, never after it
    # (an epoch takes 0.15-0.5 s here; with 4, a fast host had finished by the SIGTERM)
    argv = ["train", *DIGITS_20, "--epochs", "12", "--eval-samples", "20", "--nproc", "2"]
    whole = tmp_path / "whole"
    process = _pyro_vae([*argv, "--out", whole])
    assert process.wait(timeout=300) == 0, process.stderr.read()
    process.stderr.close()
    process.stdout.close()

    def started(run: Path) -> subprocess.Popen:
        process = _pyro_vae([*argv, "--resume", "auto", "--out", run])
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert process.poll() is None
        return process

    killed = tmp_path / "killed"
    process = started(killed)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)
    _one_line(process, 1, "training process 1 (of 2) was lost (killed by SIGKILL)")

    run = tmp_path / "run"
    process = started(run)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _one_line(process, 143, "stopped by SIGTERM")
    assert not (run / "report.md").exists()
    process = _pyro_vae([*argv, "--resume", "auto", "--out", run])
    assert process.wait(timeout=300) == 0, process.stderr.read()
    process.stderr.close()
    process.stdout.close()
    assert_same_run(whole, run)


# ---------------------------------------------------------------------- 12. resource limits
def _limited(limit: int, size: int):
    def apply() -> None:
        import resource

        resource.setrlimit(limit, (size, size))

    return apply


def test_12_a_low_address_space_limit_is_one_line_with_exit_1(tmp_path):
    import resource

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for kilobytes in (1_500_000, 3_000_000):  # (torch's import fails, or aborts in C++)
        result = subprocess.run(
            [sys.executable, "-m", "pyro_vae", "train", *TINY_RUN, "--out", tmp_path / "r"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            preexec_fn=_limited(resource.RLIMIT_AS, kilobytes * 1024),
            timeout=120,
        )
        assert result.returncode == 1, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"ulimit -v {kilobytes} KiB" in result.stderr
        assert not (tmp_path / "r").exists()


def test_12_a_file_size_limit_is_an_environment_failure_naming_the_file(tmp_path):
    import resource

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "r"
    result = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "train", *TINY_RUN, "--epochs", "1", "--out", out],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=_limited(resource.RLIMIT_FSIZE, 20 * 1024),
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "file size limit exceeded" in result.stderr and "checkpoint.pt" in result.stderr


def test_11_a_resumed_run_keeps_the_step_path_it_started_on_so_train_elbo_is_bit_identical(
    tmp_path, capsys, monkeypatch
):
    """The captured graph and the eager ELBO agree in the parameters bit for bit but may
    round the reported bound differently; with ``compile`` auto a resumed run, having
    fewer steps left, could take the other path. Here the decision is forced to differ
    on resume: the run keeps the path recorded in its checkpoint."""
    monkeypatch.setattr(Trainer, "compiles", lambda self: self.epoch == 0 and self.step == 0)
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert run_cli(["train", *RUN, *EPOCHS, "--out", whole], capsys)[0] == 0
    assert load_checkpoint(whole / "checkpoint.pt")["compiled"] == [True, 3]
    _signal_at_step(monkeypatch, 14)
    code, _, err = run_cli(["train", *RUN, *EPOCHS, "--resume", "auto", "--out", run], capsys)
    assert code == 143, err
    monkeypatch.setattr(Step, "loss_and_grads", _ORIGINAL_LOSS_AND_GRADS)
    paths = []
    original_run = Trainer.run

    def run_and_record(self, *args, **kwargs):
        try:
            return original_run(self, *args, **kwargs)
        finally:
            paths.append(self.loss.enabled)

    monkeypatch.setattr(Trainer, "run", run_and_record)
    code, _, err = run_cli(["train", *RUN, *EPOCHS, "--resume", "auto", "--out", run], capsys)
    assert code == 0, err
    assert paths == [True]  # (compiles() said False: the recorded path was taken)
    assert_same_run(whole, run)  # train_elbo included, bit for bit


_ORIGINAL_LOSS_AND_GRADS = Step.loss_and_grads


def test_1_reproduce_continues_a_cell_stopped_before_its_first_checkpoint(tmp_path, capsys):
    table = tmp_path / "table"
    cell = table / "1l-vae-k1"
    cell.mkdir(parents=True)
    (cell / "config.json").write_text("{}")  # (what a SIGTERM before the checkpoint left)
    (cell / ".lock").write_text("PID 1: pyro-vae train")
    argv = ["reproduce", "iwae-table1", "--out", table, "--cells", "1l-vae-k1"]
    argv += ["--dataset", "digits", "--limit", "100", "--epochs", "1", "--eval-samples", "5"]
    code, out, err = run_cli([*argv, "--quiet"], capsys)
    assert code == 0, err
    assert load_checkpoint(cell / "checkpoint.pt")["epoch"] == 1
    assert (table / "iwae-table1.md").exists()
