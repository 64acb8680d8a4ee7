"""``train`` under ``torchrun``: the launch (``--nproc N``), and the first process telling
the others what to train (:class:`Followers`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pyro_vae.app.training_run import PreparedRun, final_evaluation_images, prepare_run
from pyro_vae.config import (
    RunConfig,
)
from pyro_vae.errors import NonFiniteError, Preempted, UserInputError


class Followers:
    """Under torchrun: the first process validates, locks and prepares the run folder
    alone, then sends the other processes the run's config to train with (or a stop,
    with the exit status, when it will not train: bad input, nothing to do)."""

    def __init__(self) -> None:
        self.sent = False

    def _send(self, payload: dict[str, Any]) -> None:
        from pyro_vae import distributed

        if not self.sent and distributed.world_size() > 1 and distributed.is_main():
            self.sent = True
            distributed.broadcast_object(payload)

    def go(self, payload: dict[str, Any]) -> None:
        self._send(payload)

    def stop(self, status: int) -> None:
        self._send({"stop": status})


def follow(args: argparse.Namespace) -> int:
    """A process other than the first under torchrun: train what the first sends."""
    from pyro_vae import distributed
    from pyro_vae.analysis.evaluation import evaluate

    payload = distributed.broadcast_object(None)
    if "stop" in payload:
        return int(payload["stop"])  # the first process said why
    config = RunConfig.from_dict(payload["config"])
    prepared = prepare_run(config, quiet=True)
    try:
        _follow_fit(prepared, payload)
    except NonFiniteError:
        return 1  # all processes stop together; the first says why
    except Preempted as stop:
        return stop.status  # (the first process says where the run stopped)
    if config.train.eval_samples:  # its share of the final evaluation
        images = final_evaluation_images(config, prepared.data).to(config.train.device)
        evaluate(prepared.vae, images, config.train.eval_samples)
    return 0


def _follow_fit(prepared: PreparedRun, payload: dict[str, Any]) -> None:
    from pyro_vae.training.fit import fit

    config = prepared.config
    fit(
        prepared.vae,
        prepared.data,
        config.train,
        run_dir=Path(payload["out"]),
        resume=payload["resume"],
        saved_config=config.to_dict(),
        progress=False,
        log=None,
    )


def launch_torchrun(nproc: int, argv: list[str] | None) -> int:
    """``--nproc N``: run this command again under ``torchrun --standalone``."""
    if nproc < 1:
        raise UserInputError(f"--nproc must be >= 1, got {nproc}")
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    import logging
    import os

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun's agent, in this process: its failure summary (40 lines, with a traceback)
    # is replaced by one line; the processes print their own errors (the first alone)
    for name in [*logging.root.manager.loggerDict, "torch.distributed"]:
        if name.startswith("torch.distributed"):  # (each sets a level of its own)
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHED_BY_NPROC] = "1"
    options = torchrun.get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "pyro_vae", *kept]
    )
    try:
        torchrun.run(options)
    except ChildFailedError as failed:
        return _failed_processes(failed, nproc)
    except SignalException as stop:  # (the agent passed the signal on to the processes)
        return 128 + int(stop.sigval)
    finally:
        os.environ.pop(LAUNCHED_BY_NPROC, None)
    return 0


#: set for the processes that ``train --nproc`` starts: a lost process is named by the
#: launcher, which knows which one it was, rather than by the processes that lost it
LAUNCHED_BY_NPROC = "PYRO_VAE_NPROC"


def _failed_processes(failed: Any, nproc: int) -> int:
    """The exit status of a failed ``--nproc`` run, and one line if a process was lost
    (killed by a signal) rather than stopped by an error it printed itself."""
    import signal as signals

    rank, failure = failed.get_first_failure()
    if failure.exitcode < 0:  # the first to fail was killed: it could not say why
        try:
            name = signals.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        print(
            f"pyro-vae train: stopped: training process {rank} (of {nproc}) was "
            f"lost (killed by {name}); the last checkpoint is intact: run the same command "
            f"with --resume auto",
            file=sys.stderr,
        )
        return 1
    return failure.exitcode if failure.exitcode > 0 else 1
