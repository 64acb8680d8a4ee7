"""Run folders: what ``pyro-vae train``, ``evaluate`` and ``sample`` read and write.

A run folder holds ``config.json`` (resolved), ``metrics.jsonl`` (one JSON object per
epoch), ``checkpoint.pt`` (latest; ``best.pt`` with early stopping), ``evaluation.json``,
``plots/*.png`` and ``report.md`` (those two: :mod:`pyro_vae.app.run_report`); ``.lock``
marks its one writer (:class:`~pyro_vae.app.lock.RunLock`).
Every input is validated before anything is written, and every file is replaced
atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple

from pyro_vae.app.lock import LOCK
from pyro_vae.config import RunConfig
from pyro_vae.errors import UserInputError
from pyro_vae.io import read_json

#: what a run writes into its folder (and --overwrite replaces)
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "best.pt",
    "evaluation.json",
    "report.md",
    "plots",
    "diagnostics",
    "tensorboard",
)
#: where --overwrite keeps the old run until the new one has its first checkpoint
REPLACED = ".replaced"
#: files of ours that do not make a folder "not empty"
_OURS = (LOCK, REPLACED)


def check_no_links(out: Path) -> None:
    """Refuse a run folder in which a file or folder this package writes is a link
    (``RUN/plots -> ~/photos``, ``RUN/checkpoint.pt -> ~/thesis.tex``): one line naming
    it, before anything is read or written (the writes refuse it too, one by one)."""
    from pyro_vae.io import check_no_link

    if not out.is_dir():
        return
    with os.scandir(out) as entries:
        for entry in entries:
            if entry.is_symlink() and (entry.name in RUN_FILES or entry.name.startswith(".")):
                check_no_link(Path(entry.path))  # (raises: it is a link)
            elif entry.name in RUN_FILES and entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as inner:
                    for item in inner:
                        if item.is_symlink():
                            check_no_link(Path(item.path))


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run (a checkpoint or a config.json)."""
    return (out / "checkpoint.pt").exists() or (out / "config.json").exists()


def is_empty(out: Path) -> bool:
    """Whether ``out`` is missing or holds only this package's lock and set-aside files."""
    return not out.exists() or all(p.name in _OURS for p in out.iterdir())


def never_trained(out: Path) -> bool:
    """Whether ``out`` holds a run stopped before its first checkpoint: a config.json,
    no checkpoint.pt or metrics, nothing but this package's files. Nothing was trained,
    so starting it again loses nothing (``--resume auto`` does)."""
    if not out.is_dir() or not (out / "config.json").is_file():
        return False
    if (out / "checkpoint.pt").exists() or (out / "metrics.jsonl").exists():
        return False
    return all(p.name in _OURS or p.name in ("config.json", "tensorboard") for p in out.iterdir())


def check_run_dir(out: Path, resume: bool, overwrite: bool, start_over: bool = False) -> None:
    """Refuse to clobber anything: explain what is there and which flag to pass.

    ``start_over``: a folder that :func:`never_trained` may be started again (the
    ``--resume auto`` of a run stopped before its first checkpoint).
    Called while holding the folder's :class:`RunLock`, after :func:`recover`."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file: pass a folder for the run")
    if resume and overwrite:
        raise UserInputError(
            "--resume continues the run in --out and --overwrite deletes it: pass one of them"
        )
    if resume:
        has_config, has_checkpoint = (
            (out / "config.json").is_file(),
            (out / "checkpoint.pt").is_file(),
        )
        if has_config and not has_checkpoint:
            raise UserInputError(
                f"--resume: {out} has a config.json but no checkpoint.pt: the run stopped "
                f"before its first checkpoint, so there is nothing to continue; start it "
                f"again with --overwrite"
            )
        if not has_checkpoint:
            raise UserInputError(
                f"--resume: {out} holds no run to resume (no checkpoint.pt): train without "
                f"--resume first"
            )
        return
    if is_empty(out) or (start_over and never_trained(out)):
        return
    if overwrite:
        if holds_run(out):
            return
        raise UserInputError(
            f"{out} is not empty and is not a pyro-vae run folder: --overwrite replaces runs "
            f"only; choose a new or empty folder"
        )
    if (out / "checkpoint.pt").exists():
        # report.md is written last: without it the run (or its evaluation) is unfinished
        finished = (out / "report.md").exists()
        state = "a finished run" if finished else "an unfinished run"
        hint = "" if finished else " or --resume to continue it"
        raise UserInputError(
            f"{out} holds {state}: pass --overwrite to replace it{hint}, or choose another --out"
        )
    raise UserInputError(f"{out} is not empty: choose a new folder, or pass --overwrite")


def move_aside(out: Path) -> None:
    """--overwrite, step one: the old run's files go into ``out/.replaced``; they are
    deleted by :func:`drop_replaced` once the new run has its first checkpoint, or put
    back by :func:`restore_replaced` if it fails before that."""
    aside = out / REPLACED
    aside.mkdir(exist_ok=True)
    for name in RUN_FILES:
        if (out / name).exists():
            os.replace(out / name, aside / name)


def restore_replaced(out: Path) -> bool:
    """Put the old run back (the new one never reached its first checkpoint)."""
    aside = out / REPLACED
    if not aside.is_dir():
        return False
    for name in RUN_FILES:
        target = out / name
        if (aside / name).exists():
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(aside / name, target)
        elif target.is_dir():  # written by the failed new run
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    shutil.rmtree(aside)
    return True


def drop_replaced(out: Path) -> None:
    """The new run has its first checkpoint: the old run's files go for good."""
    if (out / REPLACED).is_dir():
        shutil.rmtree(out / REPLACED)


def recover(out: Path) -> str | None:
    """Finish what a killed writer left (call while holding the lock): remove its
    temporary files; after an interrupted --overwrite, restore the old run if the new
    one never reached a checkpoint, else drop the old one. Returns a note for the user."""
    from pyro_vae.io import remove_stale_temporaries

    if not out.is_dir():
        return None
    remove_stale_temporaries(
        out, (*RUN_FILES, "comparison.json", "comparison.csv", "comparison.md")
    )
    if not (out / REPLACED).is_dir():
        return None
    if _trained_epochs(out / "checkpoint.pt") >= 1:
        drop_replaced(out)
        return f"note: removed the run that an interrupted --overwrite replaced in {out}"
    restore_replaced(out)
    return f"note: restored the run in {out} that an interrupted --overwrite had set aside"


def _trained_epochs(path: Path) -> int:
    """Epochs a checkpoint holds; 0 if it is missing or does not load (the epoch-0
    checkpoint a new run saves before training does not make it stand)."""
    from pyro_vae.errors import CheckpointError
    from pyro_vae.training.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path)["epoch"] if path.exists() else 0
    except CheckpointError:
        return 0


# ---------------------------------------------------------------------- records checked
#: what every evaluation.json holds, as finite numbers (the report and tables read them)
EVALUATION_NUMBERS = ("test_elbo", "test_log_likelihood", "test_nll", "importance_samples")


def metrics_damage(out: Path, history: list[dict[str, Any]]) -> str | None:
    """How ``out/metrics.jsonl`` departs from the checkpoint's ``history`` (each line is
    ``dumps_json`` of one epoch), or ``None`` when it matches line for line."""
    from pyro_vae.io import dumps_json

    path = out / "metrics.jsonl"
    if not path.is_file():
        return "it is missing" if history else None
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return f"it cannot be read ({error})"
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    else:
        return "its last line is cut short"
    for number, line in enumerate(lines, start=1):
        if number > len(history):
            return f"it has {len(lines)} lines for the checkpoint's {len(history)} epochs"
        if line != dumps_json(history[number - 1]):
            try:
                json.loads(line)
            except json.JSONDecodeError:
                return f"line {number} is not valid JSON"
            return f"line {number} differs from epoch {number} of the checkpoint"
    if len(lines) < len(history):
        return f"it has {len(lines)} lines for the checkpoint's {len(history)} epochs"
    return None


def repair_metrics(out: Path, history: list[dict[str, Any]]) -> str | None:
    """Rewrite a damaged ``metrics.jsonl`` from the checkpoint's history (the truth,
    covered by its digest); returns a note saying what was wrong, or ``None``."""
    from pyro_vae.io import atomic_write_text, dumps_json

    damage = metrics_damage(out, history)
    if damage is None:
        return None
    atomic_write_text("".join(dumps_json(e) + "\n" for e in history), out / "metrics.jsonl")
    return (
        f"note: {out / 'metrics.jsonl'} was damaged ({damage}): rewritten from the "
        f"checkpoint's history"
    )


def evaluation_damage(path: Path) -> str | None:
    """Why ``evaluation.json`` cannot be used (not JSON, numbers missing or not finite),
    or ``None`` when it can."""
    import math

    try:
        result = read_json(path, "evaluation file")
    except UserInputError as error:
        return str(error)
    if not isinstance(result, dict):
        return f"{path} does not hold a JSON object"
    for key in EVALUATION_NUMBERS:
        value = result.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{path} has no number {key!r}"
        if not math.isfinite(value):
            return f"{path} has a non-finite {key!r}"
    return None


def check_run_data(checkpoint: dict[str, Any], data: Any, action: str) -> None:
    """Refuse to ``action`` a run on data other than those it was trained on (the
    checkpoint keeps their SHA-256 by split)."""
    from pyro_vae.training.trainer import check_data_digest

    check_data_digest(checkpoint.get("data_digest"), data.digests(), action)


def config_differences(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``section.key: saved -> given`` for every setting that differs."""
    differences = []
    for section in sorted(set(saved) | set(given)):
        old, new = saved.get(section, {}), given.get(section, {})
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                differences.append(f"{section}: {old!r} -> {new!r}")
            continue
        for key in sorted(set(old) | set(new)):
            if _normalized(old.get(key)) != _normalized(new.get(key)):
                differences.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return differences


def _normalized(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def run_config(run_dir: Path, checkpoint: dict[str, Any]) -> RunConfig:
    """The config a run was trained with: the checkpoint's own (covered by its digest),
    which ``config.json`` must match; an edited ``config.json`` is refused, naming each
    changed setting."""
    from pyro_vae.errors import CheckpointError

    try:
        config = RunConfig.from_dict(checkpoint["config"], source="the checkpoint's config")
    except UserInputError as error:
        raise CheckpointError(f"{run_dir}/checkpoint.pt: {error}") from None
    written = read_json(run_dir / "config.json", "config file")
    written = written if isinstance(written, dict) else {}
    # the one setting config.json may hold ahead of the checkpoint: the epochs a
    # `--resume --epochs N` asked for, written before its first epoch was checkpointed
    section = written.get("train")
    target = section.get("epochs") if isinstance(section, dict) else None
    if isinstance(target, int) and not isinstance(target, bool) and target >= checkpoint["epoch"]:
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, epochs=max(1, target))
        )
    changed = config_differences(config.to_dict(), written)
    if changed:
        raise UserInputError(
            f"{run_dir}/config.json differs from the config its checkpoint was trained with "
            f"({'; '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}): restore "
            f"config.json (the checkpoint's config is the truth), or start a new run"
        )
    return config


class LoadedRun(NamedTuple):
    """A run folder loaded by :func:`load_run` (a tuple too: ``config, model, data,
    checkpoint = load_run(...)``)."""

    #: the run's config (the checkpoint's own)
    config: RunConfig
    #: the model with its trained parameters, on the device asked for, in eval mode
    model: Any
    #: the run's data set, or ``None`` when loaded ``with_data=False``
    data: Any
    #: the verified checkpoint the parameters came from (the best epoch's with ``best``)
    checkpoint: dict[str, Any]


def load_run(
    run_dir: str | Path, device: str = "cpu", best: bool = True, with_data: bool = True
) -> LoadedRun:
    """Config, model (with trained parameters), data and checkpoint of a run folder.

    :param run_dir: a folder written by ``pyro-vae train`` or by :func:`pyro_vae.fit`
        with ``run_dir`` (paths in it are absolute: it loads from any directory).
    :param device: where the model goes.
    :param best: the early-stopped run's best epoch rather than its last.
    :param with_data: load the data set too; without it, the data returned is ``None``
        (sampling needs no data).
    :returns: a :class:`LoadedRun`: ``(config, model, data, checkpoint)``, by name too.

    The checkpoint is verified (digest, structure); the config is the checkpoint's own,
    which ``config.json`` must match."""
    import torch

    from pyro_vae.data import data_shape_of
    from pyro_vae.models.build import build_vae
    from pyro_vae.training.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserInputError(
            f"run folder {run_dir} does not exist: pass the --out of a training run"
        )
    if not (run_dir / "config.json").exists():
        raise UserInputError(f"{run_dir} has no config.json: is it a pyro-vae run folder?")
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    config = run_config(run_dir, checkpoint)
    if best and checkpoint.get("stopped_early") and (run_dir / "best.pt").exists():
        checkpoint = load_checkpoint(run_dir / "best.pt")
    data = config.data.load(config.train.seed) if with_data else None
    if data is not None:
        check_run_data(checkpoint, data, "evaluate")
    shape = data.data_shape if data is not None else data_shape_of(config.data.dataset)
    vae = build_vae(config.model, shape)
    load_parameters(vae, checkpoint["model"], run_dir)
    vae.to(device).eval()
    torch.set_grad_enabled(True)
    return LoadedRun(config, vae, data, checkpoint)


def load_parameters(vae: Any, state: dict[str, Any], where: Path) -> None:
    """``vae.load_state_dict(state)``, with the first mismatch named if it does not fit."""
    from pyro_vae.errors import CheckpointError

    try:
        vae.load_state_dict(state)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        problem = lines[1] if len(lines) > 1 else (lines[0] if lines else "does not fit")
        raise CheckpointError(
            f"the checkpoint in {where} does not fit the model its config describes "
            f"({problem[:160]}): it was written for another model; start a new run"
        ) from None


def environment() -> dict[str, Any]:
    """The versions and machine a run was made with, for its report."""
    import pyro
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(terse=True),
    }


def command_line(argv: list[str] | None) -> str:
    """The ``pyro-vae`` command line as typed (``argv``, or ``sys.argv``), shell-quoted."""
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return "pyro-vae " + shlex.join(args)
