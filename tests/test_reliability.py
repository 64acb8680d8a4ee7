"""Regression tests for the adversarial report: one per reproduced failure.

Each test is one bullet of the report (numbered as there), run against the CLI as a
careless or hostile user would: the answer is success, or one line with exit status 2
(bad input) or 1 (the machine or the numbers failed), and nothing is lost or changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_vae.app.cli import main
from pyro_vae.io import dumps_json
from pyro_vae.training.checkpoint import FORMAT, encode_checkpoint, load_checkpoint

from .helpers import TINY_RUN, digest, refused, run_cli

TINY = [*TINY_RUN, "--monitor-images", "50"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert main(["train", *TINY, "--epochs", "2", "--eval-samples", "30", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    return copy


def craft(path: Path, contents: dict) -> None:
    """Write ``contents`` as a checkpoint with a valid digest (an attacker who knows the
    format): only the structure checks stand between it and the model."""
    path.write_bytes(encode_checkpoint(contents))


# ---------------------------------------------------------------------- 1. one writer
def _train_process(out: Path, *flags: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pyro_vae", "train", *TINY, *flags, "--quiet", "--out", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read()


def test_1_a_second_writer_is_refused_with_the_holders_pid(tmp_path, capsys):
    out = tmp_path / "run"
    first = _train_process(out, "--epochs", "400", "--seed", "0", "--eval-samples", "0")
    try:
        _wait_for(out / "checkpoint.pt", first)
        for flags in ([], ["--overwrite"], ["--resume"]):
            err = refused(
                ["train", *TINY, "--seed", "1", *flags, "--out", out],
                capsys,
                f"is in use by another pyro-vae process (PID {first.pid}",
            )
            assert "wait for it to finish" in err
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
    # the lock went with the killed process: the run resumes, its config is its own
    done = load_checkpoint(out / "checkpoint.pt")["epoch"]
    code, _, err = run_cli(
        ["train", "--resume", "--epochs", done + 1, "--quiet", "--out", out], capsys
    )
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["seed"] == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == done + 1


def test_1_temporary_files_are_unique_per_writer_and_cleaned_up(finished):
    assert not list(finished.glob("*.tmp")) and not list(finished.glob(".*.tmp"))


# ---------------------------------------------------------------------- 2. validate first
def test_2_overwrite_with_a_bad_value_keeps_the_finished_run(run_copy, capsys):
    refused(
        ["train", *TINY, "--overwrite", "--particles", "1000000000000", "--out", run_copy],
        capsys,
        "lower --batch-size or --particles",
        watched=run_copy,
    )


def test_2_overwrite_replaces_the_run_only_once_the_new_one_has_a_checkpoint(run_copy, capsys):
    before = digest(run_copy)
    # fails at its first step (not at validation): the old run comes back untouched
    code, _, err = run_cli(
        ["train", *TINY, "--overwrite", "--lr", "1e38", "--epochs", "2", "--out", run_copy],
        capsys,
    )
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert digest(run_copy) == before and not (run_copy / ".replaced").exists()
    code, _, _ = run_cli(
        ["train", *TINY, "--overwrite", "--epochs", "1", "--eval-samples", "0", "--out", run_copy],
        capsys,
    )
    assert code == 0 and not (run_copy / ".replaced").exists()
    assert load_checkpoint(run_copy / "checkpoint.pt")["epoch"] == 1


def test_2_an_interrupted_overwrite_is_recovered_by_the_next_command(run_copy, capsys):
    from pyro_vae.app.runs import move_aside

    before = digest(run_copy)
    move_aside(run_copy)  # what a kill right after setting the old run aside leaves
    (run_copy / "config.json").write_text("{}")  # ... with the new run's first file
    code, _, err = run_cli(["train", "--resume", "--quiet", "--out", run_copy], capsys)
    assert "restored the run" in err
    assert digest(run_copy) == before or code == 0


def test_2_a_kill_during_the_first_epoch_of_an_overwrite_restores_the_old_run(
    run_copy, capsys, tmp_path
):
    from pyro_vae.app.runs import move_aside

    before = digest(run_copy)
    epoch_zero = load_checkpoint(run_copy / "checkpoint.pt")
    epoch_zero.update(epoch=0, step=0, history=[], best_epoch=None, finished=False)
    move_aside(run_copy)
    # what the new run had written when it was killed in epoch 1: its config and the
    # checkpoint it saves before training
    shutil.copy(run_copy / ".replaced" / "config.json", run_copy / "config.json")
    craft(run_copy / "checkpoint.pt", epoch_zero)
    code, _, err = run_cli(["train", "--resume", "--quiet", "--out", run_copy], capsys)
    assert "restored the run" in err, err
    assert digest(run_copy) == before or code == 0
    assert load_checkpoint(run_copy / "checkpoint.pt")["epoch"] == 2


def test_2_a_kill_before_the_first_epoch_of_a_longer_resume_leaves_the_run_usable(run_copy, capsys):
    # `--resume --epochs 4` writes config.json (epochs 4) before its first checkpoint: a
    # kill in that window must not make the run look edited
    saved = json.loads((run_copy / "config.json").read_text())
    saved["train"]["epochs"] = 4
    (run_copy / "config.json").write_text(json.dumps(saved))
    code, _, err = run_cli(["evaluate", run_copy, "--samples", "2"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["train", "--resume", "--quiet", "--out", run_copy], capsys)
    assert code == 0, err  # the requeued resume trains to the epochs it was given
    assert load_checkpoint(run_copy / "checkpoint.pt")["epoch"] == 4


def test_1_a_lock_whose_holder_record_cannot_be_written_is_still_released(tmp_path, monkeypatch):
    import errno

    from pyro_vae.app import lock

    real = os.write

    def full(descriptor, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.os, "write", full)
    with lock.RunLock(tmp_path / "r", "first"):
        pass
    monkeypatch.setattr(lock.os, "write", real)
    with lock.RunLock(tmp_path / "r", "second"):  # not "in use": the first let go
        assert (tmp_path / "r" / lock.LOCK).exists()
    assert not (tmp_path / "r").exists()  # created for the lock, removed with it


def test_1_a_lock_survives_its_folder_being_removed_by_the_last_holder(tmp_path, monkeypatch):
    from pyro_vae.app import lock

    folder = tmp_path / "r"
    folder.mkdir()
    real = os.open
    removed = []

    def open_after_removal(path, *args, **kwargs):
        if not removed:  # the holder releases between our mkdir and our open
            removed.append(True)
            shutil.rmtree(folder)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(lock.os, "open", open_after_removal)
    with lock.RunLock(folder, "second"):
        assert (folder / lock.LOCK).exists()


def test_2_a_refused_command_leaves_a_users_temporary_files_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / ".draft.tmp").write_text("mine")
    refused(["train", *TINY, "--out", out], capsys, "not empty", watched=out)


# ---------------------------------------------------------------------- 3. corruption
def test_3_every_single_bit_flip_in_a_checkpoint_is_detected(run_copy, capsys):
    import random

    checkpoint = run_copy / "checkpoint.pt"
    original = checkpoint.read_bytes()
    rng = random.Random(13)
    for position in rng.sample(range(len(original)), 40):
        corrupted = bytearray(original)
        corrupted[position] ^= 1 << rng.randrange(8)
        checkpoint.write_bytes(bytes(corrupted))
        for argv in (["evaluate", run_copy, "--samples", "5"], ["sample", run_copy, "--n", "4"]):
            code, _, err = run_cli(argv, capsys)
            assert code == 2 and len(err.strip().splitlines()) == 1, (position, err)
    checkpoint.write_bytes(original)


def test_3_an_edited_config_json_is_refused_on_resume_naming_each_change(run_copy, capsys):
    path = run_copy / "config.json"
    config = json.loads(path.read_text())
    config["train"]["lr"], config["train"]["seed"] = 0.5, 7
    path.write_text(json.dumps(config))
    err = refused(
        ["train", "--resume", "--epochs", "4", "--out", run_copy],
        capsys,
        "differs from the config its checkpoint was trained with",
        watched=run_copy,
    )
    assert "train.lr: 0.001 -> 0.5" in err and "train.seed: 0 -> 7" in err


def test_3_a_failed_resume_writes_nothing(run_copy, capsys):
    refused(
        ["train", "--resume", "--epochs", "0", "--out", run_copy],
        capsys,
        "epochs must be an integer >= 1",
        watched=run_copy,
    )


# ---------------------------------------------------------------------- 4. finite state
def test_4_a_learning_rate_outside_float32_is_refused_up_front(tmp_path, capsys):
    refused(["train", *TINY, "--lr", "1e39", "--out", tmp_path / "r"], capsys, "learning rate")
    assert not (tmp_path / "r").exists()


def test_4_an_overflowing_update_stops_with_the_truth_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    err = refused(
        ["train", *TINY, "--lr", "1e38", "--batch-size", "20", "--out", out],
        capsys,
        "learning rate 1e+38",
        status=1,
    )
    assert "Lower the learning rate (--lr)" in err and "were not updated" not in err
    assert not out.exists()  # a failed first epoch takes back what the command wrote


def test_4_squared_gradients_that_overflow_adam_stop_the_run(tmp_path, capsys):
    """--lr 1e6 once finished with inf in the saved Adam state: now the run either stops
    with a true message before the step, or finishes with finite state throughout."""
    out = tmp_path / "r"
    code, _, err = run_cli(["train", *TINY, "--lr", "1e6", "--epochs", "3", "--out", out], capsys)
    assert code in (0, 1), err
    if code == 1:
        assert len(err.strip().splitlines()) == 1 and "Lower the learning rate" in err
    for checkpoint in out.glob("*.pt"):  # load_checkpoint refuses non-finite state
        load_checkpoint(checkpoint)
    for line in (out / "metrics.jsonl").read_text().splitlines() if out.exists() else []:
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_4_json_outputs_hold_null_with_a_reason_for_non_finite_numbers():
    text = dumps_json({"a": float("nan"), "b": [1.0, float("-inf")], "c": {"d": float("inf")}})
    value = json.loads(text, parse_constant=lambda name: pytest.fail(name))
    assert value["a"] is None and value["b"] == [1.0, None] and value["c"]["d"] is None
    assert value["null_values"] == {"a": "NaN", "b[1]": "-inf", "c.d": "+inf"}


# ---------------------------------------------------------------------- 5. the environment
def test_5_a_full_disk_is_named_and_the_last_checkpoint_stays(run_copy, capsys, monkeypatch):
    import errno

    from pyro_vae.training import checkpoint as files

    before = (run_copy / "checkpoint.pt").read_bytes()
    real = files.atomic_write_bytes

    def full(data, path):
        if Path(path).name == "checkpoint.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(data, path)

    monkeypatch.setattr(files, "atomic_write_bytes", full)
    err = refused(
        ["train", "--resume", "--epochs", "4", "--quiet", "--out", run_copy],
        capsys,
        "disk full",
        status=1,
    )
    assert "permissions" not in err
    assert (run_copy / "checkpoint.pt").read_bytes() == before


def test_5_running_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from pyro_vae.training import trainer as training

    def no_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
            "allocate memory: you tried to allocate 1000000000000 bytes"
        )

    monkeypatch.setattr(training.Trainer, "train_epoch", no_memory)
    refused(["train", *TINY, "--out", tmp_path / "r"], capsys, "out of memory", status=1)


# ---------------------------------------------------------------------- 6. bad values
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--latent-dims", "100000000000"], "lower --hidden or --latent-dims"),
        (["--hidden", "10000000000,10000000000"], "lower --hidden or --latent-dims"),
        (["--particles", "100000000000000"], "lower --batch-size or --particles"),
        (["--latent-dims", "5,,3"], "no empty item"),
    ],
)
def test_6_sizes_beyond_memory_are_refused_before_anything_is_written(
    flags, message, tmp_path, capsys
):
    refused(["train", *TINY, *flags, "--out", tmp_path / "r"], capsys, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"train": {"eval_particles": 100000000000}}', "lower eval_particles"),
        ('{"model": {"prior_scale": 1e308}}', "prior_scale must be in [1e-06, 1e+06]"),
        ('{"model": {"prior_loc": 1e308}}', "prior_loc must be at most"),
        ('{"model": {"gaussian_scale": 1e-300}}', "gaussian_scale must be in"),
        ("[" * 5000 + "]" * 5000, "nested more than 20 levels"),
    ],
)
def test_6_bad_config_values_are_refused_up_front(content, message, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(content)
    refused(["train", *TINY, "--config", config, "--out", tmp_path / "r"], capsys, message)
    assert not (tmp_path / "r").exists()


def test_6_a_device_or_a_folder_as_config_is_refused(tmp_path, capsys):
    refused(["train", "--config", "/dev/zero", "--out", tmp_path / "r"], capsys, "not a regular")
    refused(["train", "--config", tmp_path, "--out", tmp_path / "r"], capsys, "is a folder")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.pop("model"), "has no 'model'"),
        (lambda c: c.update(model=[1, 2]), "has 'model' of type list"),
        (lambda c: next(iter(c["model"].values())).fill_(float("nan")), "non-finite parameter"),
        (lambda c: c.update(history="not a list"), "has 'history' of type str"),
        (lambda c: c.update(epoch=-3), "negative 'epoch'"),
        (lambda c: c["history"].__setitem__(0, {}), "epoch 1 lacks its numbers"),
        (lambda c: c.update(stopped_early=True, best_epoch=9), "'best_epoch' that is not one"),
        (  # finite in float64, inf in the float32 parameters it is loaded into
            lambda c: c["model"].update(
                {k: v.double().fill_(1e300) for k, v in list(c["model"].items())[:1]}
            ),
            "non-finite parameter",
        ),
    ],
)
def test_6_crafted_checkpoints_are_refused_by_every_reader(change, message, run_copy, capsys):
    checkpoint = run_copy / "checkpoint.pt"
    contents = load_checkpoint(checkpoint)
    change(contents)
    craft(checkpoint, contents)
    for argv in (
        ["evaluate", run_copy, "--samples", "5"],
        ["sample", run_copy, "--n", "4"],
        [
            "diagnose",
            run_copy,
            "--images",
            "1",
            "--chains",
            "1",
            "--warmup",
            "4",
            "--samples",
            "4",
            "--khat-images",
            "2",
            "--khat-samples",
            "30",
            "--local-steps",
            "2",
            "--is-samples",
            "30",
            "--quiet",
        ],
        ["train", "--resume", "--epochs", "5", "--out", run_copy],
    ):
        refused(argv, capsys, message, watched=run_copy)


def test_6_a_pickle_payload_is_refused_without_torchs_hint(run_copy, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": FORMAT, "payload": Payload()}, run_copy / "checkpoint.pt")
    err = refused(["evaluate", run_copy], capsys, "which pyro-vae never loads")
    assert "weights_only" not in err


def test_6_one_training_image_still_finishes_with_its_plots(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run_cli(
        ["train", *TINY, "--limit", "1", "--epochs", "1", "--eval-samples", "30", "--out", out],
        capsys,
    )
    assert code == 0, err
    assert (out / "report.md").exists() and (out / "plots" / "latent.png").exists()


def test_6_diagnose_with_too_few_samples_for_khat_finishes_and_says_why(run_copy, capsys):
    code, out, err = run_cli(
        [
            "diagnose",
            run_copy,
            "--images",
            "1",
            "--chains",
            "1",
            "--warmup",
            "4",
            "--samples",
            "4",
            "--khat-images",
            "5",
            "--khat-samples",
            "10",
            "--local-steps",
            "2",
            "--is-samples",
            "30",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    report = (run_copy / "diagnostics" / "diagnostics.md").read_text()
    assert "too few for a Pareto fit" in report and "too few for a Pareto fit" in out


# ---------------------------------------------------------------------- 7. smaller
def test_7_compare_refuses_a_seed_range_past_32_bits_before_any_work(tmp_path, capsys):
    out = tmp_path / "c"
    refused(
        ["compare", "--seed", "4294967295", "--repeats", "2", "--out", out, "--quiet"],
        capsys,
        "each must be in [0, 4294967295]",
    )
    assert not out.exists()


def test_7_an_absurd_number_of_importance_samples_is_refused_with_the_time_it_needs(
    finished, capsys
):
    err = refused(["evaluate", finished, "--samples", "1000000000000"], capsys, "would take")
    assert "lower the number of samples" in err


def test_7_resume_after_a_kill_before_the_first_checkpoint_says_what_is_missing(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text("{}")
    refused(["train", "--resume", "--out", out], capsys, "no checkpoint.pt: the run stopped")


def test_7_a_checkpoint_for_another_model_names_the_mismatch(run_copy, capsys):
    checkpoint = run_copy / "checkpoint.pt"
    contents = load_checkpoint(checkpoint)
    name = next(n for n in contents["model"] if n.endswith("weight"))
    contents["model"][name] = torch.zeros(3, 3)
    craft(checkpoint, contents)
    err = refused(["evaluate", run_copy], capsys, "does not fit the model its config describes")
    assert "size mismatch" in err and name in err
