"""A run folder trained under ``train``'s policy: :class:`RunRequest` says what to train
into which folder and how to treat what the folder holds (start, ``resume``: ``"auto"``
or ``"always"``, ``overwrite``); :func:`train_run` carries it out. ``train``,
``reproduce`` (one request per cell, on any executor) and the first process under
``torchrun`` go through it.

The order: the config (no file touched), data and model (read only), memory; then the
folder's lock; what the folder holds; for a resume the verified checkpoint and its own
config; only then any write. Until the first epoch of this call is checkpointed, a
failure takes back what it wrote (and ``overwrite`` puts the old run back); after it,
the run is left resumable.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pyro_vae.app.flags import TRAIN_FLAGS
from pyro_vae.app.training_run import PreparedRun, Transaction, prepare_run, run_training
from pyro_vae.config import RunConfig
from pyro_vae.errors import Preempted, UserInputError

if TYPE_CHECKING:
    from pyro_vae.app.torchrun import Followers

__all__ = ["RunRequest", "train_run"]

#: the settings of a run: given the run's saved config when it is resumed (the settings
#: not given are the saved run's own), ``None`` when it starts
Settings = Callable[[RunConfig | None], RunConfig]


@dataclass(frozen=True)
class RunRequest:
    """One run to train into a folder, and how the folder is treated.

    ``settings`` builds the run's config (see :data:`Settings`): for a resume, the config
    it returns may differ from the saved one only in ``epochs``, the final evaluation's
    settings and the device; any other difference is refused, named. ``out=None``: a
    fresh ``runs/<time>`` folder. ``command`` is the command line recorded in the
    folder's lock. A request is picklable when its settings are (a Ray task's argument).
    """

    settings: Settings
    out: Path | None = None
    resume: Literal["auto", "always"] | None = None
    overwrite: bool = False
    quiet: bool = False
    tensorboard: bool = False
    command: str = "pyro-vae train"


def train_run(request: RunRequest, followers: Followers | None = None) -> int:
    """Train ``request`` into its folder (started, continued or left as it is when it is
    finished), evaluate it and write its report; the exit status (0). Bad input raises
    :class:`~pyro_vae.errors.UserInputError` before anything is written; a signal's stop
    raises :class:`~pyro_vae.errors.Preempted` with the run resumable. Under torchrun the
    first process passes its ``followers``, who are told what to train."""
    from pyro_vae.app.lock import RunLock

    if request.resume and request.overwrite:
        raise UserInputError(
            "--resume continues the run in --out and --overwrite deletes it: pass one of them"
        )
    out = request.out
    if out is None:
        if request.resume:
            raise UserInputError("--resume needs the run folder: pass --out")
        out = _timestamped_out()
    start_over = request.resume == "auto"
    resume = request.resume == "always"
    if request.resume == "auto":  # requeue-safe: continue a run with a checkpoint, or start it
        # (a folder stopped before its first checkpoint is started over: nothing was trained)
        resume = (out / "checkpoint.pt").is_file()
    prepared = None if resume else prepare_run(request.settings(None))
    with RunLock(out, request.command):
        return _train_locked(request, out, resume, prepared, start_over, followers)


def _timestamped_out() -> Path:
    """A fresh folder per run when --out is not given: runs/YYYYmmdd-HHMMSS (with -2,
    -3, ... when that exists already)."""
    import time

    stamp = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out, number = stamp, 1
    while out.exists():
        number += 1
        out = stamp.with_name(f"{stamp.name}-{number}")
    return out


def _train_locked(
    request: RunRequest,
    out: Path,
    resume: bool,
    prepared: PreparedRun | None,
    start_over: bool,
    followers: Followers | None,
) -> int:
    from pyro_vae.app.runs import (
        check_no_links,
        check_run_data,
        check_run_dir,
        holds_run,
        move_aside,
        recover,
        run_config,
    )
    from pyro_vae.training.checkpoint import load_checkpoint

    check_no_links(out)  # (before anything in it is moved, read or written)
    note = recover(out)
    if note:
        print(note, file=sys.stderr)
    check_run_dir(out, resume, request.overwrite, start_over=start_over)
    if resume:
        checkpoint = load_checkpoint(out / "checkpoint.pt")  # verified: digest, structure
        config = _resumed_config(request, out, run_config(out, checkpoint))
        if _nothing_to_add(config, checkpoint, out):
            return 0
        prepared = prepare_run(config)
        check_run_data(checkpoint, prepared.data, "resume")
        prepared.start_epoch = checkpoint["epoch"]
    assert prepared is not None  # (prepared before the lock, or from the checkpoint above)
    replacing = request.overwrite and holds_run(out)
    if replacing:
        move_aside(out)
    transaction = Transaction(out, replacing)
    try:
        return run_training(
            prepared,
            out,
            transaction,
            resume=resume,
            quiet=request.quiet,
            tensorboard=request.tensorboard,
            announce=None if followers is None else followers.go,
        )
    except Preempted:
        transaction.commit()  # the checkpoint holds the position: the run stands
        raise
    except BaseException:
        transaction.rollback()
        raise


def _resumed_config(request: RunRequest, out: Path, saved: RunConfig) -> RunConfig:
    """The run's own config, with --epochs, the final evaluation's settings and the device
    as given (none changes what was trained; a run started on the CPU may go on on a GPU,
    drawing the GPU's noise from there on). The other options may be given too (a requeued
    job repeats its command line) but must equal the run's own: each real change is
    refused, naming the saved and the given value."""
    given = request.settings(saved)
    free = {name: getattr(saved.train, name) for name in _FREE_ON_RESUME}
    changed = _flag_differences(
        saved, dataclasses.replace(given, train=dataclasses.replace(given.train, **free))
    )
    if changed:
        raise UserInputError(
            f"--resume continues {out} with its own settings; only --epochs, --eval-samples, "
            f"--eval-images and --device may change, and these differ: "
            f"{'; '.join(changed)} (start a new run for other settings)"
        )
    return given


#: settings a resumed run may change: how long it trains, how it is evaluated at the end,
#: where it runs (the checkpoint loads on the CPU and moves to the device)
_FREE_ON_RESUME = ("epochs", "eval_samples", "eval_images", "device")


def _flag_differences(saved: RunConfig, given: RunConfig) -> list[str]:
    """``--flag: saved X, given Y`` for each setting that differs (config keys without a
    flag are named as ``section.key``)."""
    names = {value: flag for flag, value in TRAIN_FLAGS.items()}

    def shown(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)

    result = []
    for section in ("data", "model", "train"):
        old, new = saved.section(section), given.section(section)
        for name in old:
            if old[name] != new[name]:
                flag = names.get((section, name))
                label = f"--{flag.replace('_', '-')}" if flag else f"{section}.{name}"
                result.append(f"{label}: saved {shown(old[name])}, given {shown(new[name])}")
    return result


def _nothing_to_add(config: RunConfig, checkpoint: dict[str, Any], out: Path) -> bool:
    """A finished run asked to go no further: say so, and change nothing. Finished means
    trained, evaluated and reported, the report written after the checkpoint and the
    evaluation (a run stopped between those, e.g. killed while writing its plots, is
    finished by running it again: its report is refreshed)."""
    from pyro_vae.app.runs import evaluation_damage, repair_metrics

    done = checkpoint["epoch"]
    finished = checkpoint["stopped_early"] or done >= config.train.epochs
    evaluation, report = out / "evaluation.json", out / "report.md"
    evaluated = not config.train.eval_samples or evaluation.exists()
    if finished and evaluated and evaluation.exists():
        damage = evaluation_damage(evaluation)
        if damage is not None:  # evaluated again, written whole
            print(f"note: {damage}: the run is evaluated again", file=sys.stderr)
            evaluated = False
    if not (finished and evaluated and report.exists()):
        return False
    note = repair_metrics(out, checkpoint["history"])
    if note:
        print(note, file=sys.stderr)
    written_before = [p for p in (out / "checkpoint.pt", evaluation) if p.exists()]
    if any(report.stat().st_mtime_ns < p.stat().st_mtime_ns for p in written_before):
        return False
    why = "stopped early" if checkpoint["stopped_early"] else f"trained {done} epochs"
    print(
        f"{out} is finished ({why}, evaluated, report written): nothing to do; pass a larger "
        f"--epochs to train further"
    )
    return True
