"""The adversarial suite: generated hostile or careless input against the CLI.

Property (for every generated input): the command succeeds (exit 0), or it answers with
exactly one line on stderr, no traceback, exit status 2 (bad input) or 1 (the machine or
the numbers failed), and every file in the run folder it pointed at is byte-identical
to what was there before. Inputs are drawn by hypothesis from a grammar of the CLI's
options (valid values, values just outside their range, absurd sizes, wrong types,
malformed lists) and of config files (known and unknown sections and keys, values of
every JSON type, deep nesting), against three kinds of folder: none yet, a finished run
and a folder of the user's that is not a run. Runs are tiny (200 digits, one or two
epochs) so that the examples that succeed stay cheap; example counts are bounded and
derandomized, so CI runs the same inputs every time.

Besides: a checkpoint truncated at every tenth of its length, and a real full disk (a
1 MiB tmpfs) where the machine lets the test mount one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_vae.app.cli import main

from .helpers import TINY_RUN, digest, run_cli

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    # capsys is read out before and after every command, so sharing it is safe
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


def assert_clean_outcome(argv, capsys, watched: Path) -> int:
    """Run ``argv``; success, or one line + exit 1/2 with ``watched`` unchanged."""
    before = digest(watched)
    code, _, err = run_cli(argv, capsys)
    if code == 0:
        return code
    lines = err.strip().splitlines()
    assert code in (1, 2), (argv, code, err)
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    assert digest(watched) == before, (argv, err)
    return code


# ---------------------------------------------------------------------- the grammar
def _values(*valid, bad=()) -> st.SearchStrategy[str]:
    common = ["", "-1", "0", "nan", "inf", "1e400", "x", "1,2", "99999999999999999999"]
    return st.sampled_from([*map(str, valid), *map(str, bad), *common])


#: train's options with values: small valid ones (so that successes stay cheap), their
#: edges, absurd sizes and garbage
OPTIONS: dict[str, st.SearchStrategy[str]] = {
    "--epochs": _values(1, 2),
    "--batch-size": _values(1, 50, 1000, bad=[10**15]),
    "--latent-dims": _values("2", "3", "2,2", bad=["5,,3", ",", "3,", "0,2", "10000000000"]),
    "--hidden": _values("8", "16", "8,8", bad=["10000000000,10000000000", "-3"]),
    "--particles": _values(1, 2, bad=[10**14]),
    "--lr": _values("1e-3", "0.01", bad=["1e39", "-0.1", "1e-50"]),
    "--estimator": st.sampled_from(["mc", "analytic", "iwae", "dreg", "stl", "nope", ""]),
    "--likelihood": st.sampled_from(["bernoulli", "gaussian", "continuous_bernoulli", "x"]),
    "--seed": _values(0, 7, bad=[2**32, 2**64, -5]),
    "--eval-samples": _values(0, 5, bad=[10**12, -2]),
    "--limit": _values(1, 3, 200, bad=[-1]),
    "--kl-warmup": _values(0, 1, bad=[-1]),
    "--free-bits": _values("0", "0.1", bad=["-1", "1e39"]),
    "--validation-size": _values(0, 20, bad=[10**9]),
    "--optimizer": st.sampled_from(["adam", "clipped_adam", "sgd"]),
    "--lr-schedule": st.sampled_from(["constant", "cosine", "exponential", "linear"]),
    "--network": st.sampled_from(["mlp", "conv", "resnet"]),
    "--device": st.sampled_from(["cpu", "cuda", "tpu"]),
    "--dataset": st.sampled_from(["digits", "imagenet"]),
    "--monitor-images": _values(10, 50, bad=[-3]),
}
SWITCHES = ["--resume", "--overwrite", "--no-compile", "--quiet", "--unknown-flag"]


@st.composite
def train_arguments(draw) -> list[str]:
    chosen = draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=4, unique=True))
    argv = []
    for flag in chosen:
        argv += [flag, draw(OPTIONS[flag])]
    argv += draw(st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True))
    return argv


JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
KEYS = {
    "model": [
        "latent_dims",
        "hidden",
        "likelihood",
        "prior_scale",
        "prior_loc",
        "guide",
        "gaussian_scale",
        "network",
        "activation",
    ],
    "data": ["dataset", "limit", "binarize", "validation_size", "data_dir"],
    "train": [
        "epochs",
        "lr",
        "batch_size",
        "particles",
        "estimator",
        "seed",
        "lr_gamma",
        "clip_norm",
        "eval_particles",
        "compile",
        "alpha",
    ],
}


@st.composite
def config_files(draw) -> str:
    """A config file's text: mostly well-formed JSON with odd values, sometimes not JSON."""
    kind = draw(st.sampled_from(["sections", "sections", "sections", "deep", "garbage"]))
    if kind == "garbage":
        return draw(st.sampled_from(["", "{", "[]", "null", "\x00\x01", '{"model": 1}']))
    if kind == "deep":
        depth = draw(st.integers(min_value=3, max_value=5000))
        return "[" * depth + "]" * depth
    config: dict = {}
    for section in draw(st.lists(st.sampled_from([*KEYS, "extra"]), max_size=3, unique=True)):
        keys = KEYS.get(section, ["what"])
        values = draw(
            st.dictionaries(
                st.sampled_from([*keys, "unknown_key"]),
                st.one_of(JSON_LEAVES, st.lists(JSON_LEAVES, max_size=3)),
                max_size=3,
            )
        )
        config[section] = values
    # a small data set always, so that a config that is valid trains in a second
    config.setdefault("data", {}).setdefault("limit", 200)
    config.setdefault("train", {}).setdefault("epochs", 1)
    return json.dumps(config)


# ---------------------------------------------------------------------- folders
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adversarial") / "finished"
    argv = ["train", *TINY_RUN, "--epochs", "1", "--eval-samples", "5", "--out", str(out)]
    assert main(argv) == 0
    return out


@contextlib.contextmanager
def target(kind: str, finished: Path):
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        if kind == "finished run":
            shutil.copytree(finished, out)
        elif kind == "user folder":
            out.mkdir()
            (out / "notes.txt").write_text("mine\n")
        yield out


FOLDERS = st.sampled_from(["none yet", "finished run", "user folder"])


@SETTINGS
@given(argv=train_arguments(), folder=FOLDERS)
def test_fuzzed_train_options_succeed_or_fail_cleanly_without_touching_the_folder(
    argv, folder, finished, capsys
):
    with target(folder, finished) as out:
        base = [
            "--dataset",
            "digits",
            "--limit",
            "200",
            "--hidden",
            "8",
            "--latent-dims",
            "2",
            "--epochs",
            "1",
            "--eval-samples",
            "0",
            "--quiet",
        ]
        # the drawn flags come last: argparse lets them override the cheap defaults
        assert_clean_outcome(["train", *base, *argv, "--out", out], capsys, out)


@SETTINGS
@given(text=config_files(), folder=FOLDERS, resume=st.booleans())
def test_fuzzed_config_files_succeed_or_fail_cleanly_without_touching_the_folder(
    text, folder, resume, finished, capsys
):
    with target(folder, finished) as out, tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "config.json"
        config.write_text(text)
        argv = ["train", "--config", config, "--quiet", "--eval-samples", "0", "--out", out]
        assert_clean_outcome([*argv, *(["--resume"] if resume else [])], capsys, out)


READER_OPTIONS = {
    "evaluate": {"--samples": _values(1, 5, bad=[10**12, -1]), "--device": st.just("cuda")},
    "sample": {"--n": _values(1, 4, bad=[10**12, -1]), "--device": st.just("cuda")},
}


@SETTINGS
@given(data=st.data())
def test_fuzzed_readers_never_change_the_run(data, finished, capsys):
    command = data.draw(st.sampled_from(sorted(READER_OPTIONS)))
    flags = data.draw(st.lists(st.sampled_from(sorted(READER_OPTIONS[command])), unique=True))
    with target("finished run", finished) as out, tempfile.TemporaryDirectory() as scratch:
        argv = [command, out]
        for flag in flags:
            argv += [flag, data.draw(READER_OPTIONS[command][flag])]
        if command == "sample":
            argv += ["--out", Path(scratch) / "s.png"]
        before = digest(out)
        assert_clean_outcome(argv, capsys, out)
        assert digest(out) == before  # a reader writes nothing into the run, even on success


# ---------------------------------------------------------------------- checkpoints
def test_a_checkpoint_truncated_anywhere_is_refused_by_every_reader(finished, capsys, tmp_path):
    whole = (finished / "checkpoint.pt").read_bytes()
    for tenth in range(10):
        out = tmp_path / f"cut{tenth}"
        shutil.copytree(finished, out)
        (out / "checkpoint.pt").write_bytes(whole[: len(whole) * tenth // 10])
        for argv in (
            ["evaluate", out, "--samples", "2"],
            ["sample", out, "--n", "2", "--out", tmp_path / "s.png"],
            ["train", "--resume", "--epochs", "2", "--quiet", "--out", out],
        ):
            assert assert_clean_outcome(argv, capsys, out) == 2


# ---------------------------------------------------------------------- a real full disk
@contextlib.contextmanager
def tiny_filesystem(size: str):
    """A tmpfs of ``size``, or a skip that says why the machine does not allow one."""
    with tempfile.TemporaryDirectory() as mountpoint:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root; the monkeypatched disk-full test covers it")
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mountpoint],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            pytest.skip(f"this machine does not allow mounting a tmpfs: {mounted.stderr.strip()}")
        try:
            yield Path(mountpoint)
        finally:
            subprocess.run(["umount", "-l", mountpoint], check=False)


def test_a_real_full_disk_is_one_line_and_the_last_checkpoint_stays(finished, capsys):
    with tiny_filesystem("1m") as disk:
        out = disk / "run"
        shutil.copytree(finished, out)
        before = (out / "checkpoint.pt").read_bytes()
        # fill what is left, so that the next checkpoint cannot be written
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as handle:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        code, _, err = run_cli(
            ["train", "--resume", "--epochs", "3", "--quiet", "--out", out], capsys
        )
        assert code == 1, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "disk full" in err and "permissions" not in err, err
        assert (out / "checkpoint.pt").read_bytes() == before
        assert not list(out.glob(".*.tmp"))  # the temporary file went with the failure
        (disk / "filler").unlink()
        code, _, err = run_cli(  # with space again, the same command finishes the run
            ["train", "--resume", "--epochs", "3", "--quiet", "--out", out], capsys
        )
        assert code == 0, err


# ---------------------------------------------------------------------- links, records (#27)
#: what a hostile user links away in a finished run, and where
LINKED = [".lock", "plots", "checkpoint.pt", "metrics.jsonl", "config.json", "report.md"]
LINK_WRITERS = {
    "train --resume": lambda out: ["train", *TINY_RUN, "--epochs", "2", "--resume", "--out", out],
    "train --resume auto": lambda out: [
        "train",
        *TINY_RUN,
        "--epochs",
        "1",
        "--eval-samples",
        "5",
        "--resume",
        "auto",
        "--out",
        out,
    ],  # fmt: skip
    "train --overwrite": lambda out: [
        "train",
        *TINY_RUN,
        "--epochs",
        "1",
        "--overwrite",
        "--out",
        out,
    ],  # fmt: skip
    "sample": lambda out: ["sample", out, "--n", "4"],
}


@settings(SETTINGS, max_examples=12)
@given(
    name=st.sampled_from(LINKED),
    writer=st.sampled_from(sorted(LINK_WRITERS)),
    records=st.sampled_from(["intact", "metrics cut", "metrics extra line", "evaluation cut"]),
)
def test_fuzzed_links_and_damaged_records_never_carry_a_write_out_of_the_run(
    name, writer, records, finished, capsys
):
    """A link planted in a finished run, with its records damaged or not: every writer
    succeeds or answers in one line, and the link's target is never written."""
    with tempfile.TemporaryDirectory() as scratch:
        out, elsewhere = Path(scratch) / "run", Path(scratch) / "elsewhere"
        shutil.copytree(finished, out)
        elsewhere.mkdir()
        (elsewhere / "v").write_text("the user's file")
        (elsewhere / "samples-4.png").write_text("the user's picture")
        if records == "metrics cut":
            (out / "metrics.jsonl").write_bytes((out / "metrics.jsonl").read_bytes()[:-9])
        elif records == "metrics extra line":
            with open(out / "metrics.jsonl", "a") as handle:
                handle.write('{"epoch": 2, "train_elbo": NaN}\n')
        elif records == "evaluation cut":
            (out / "evaluation.json").write_text((out / "evaluation.json").read_text()[:30])
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
            path.symlink_to(elsewhere, target_is_directory=True)
        else:
            path.unlink(missing_ok=True)
            path.symlink_to(elsewhere / "v")
        before = digest(elsewhere)
        code, _, err = run_cli(LINK_WRITERS[writer](out), capsys)
        assert code in (0, 2), (writer, name, code, err)
        if code:
            assert len(err.strip().splitlines()) == 1 and "symbolic link" in err, err
        assert digest(elsewhere) == before, (writer, name, err)
