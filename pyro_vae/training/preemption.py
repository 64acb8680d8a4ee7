"""Graceful preemption: SIGTERM and SIGUSR1 stop training after the current step.

A cluster stops a job with SIGTERM (SLURM, Kubernetes, torchrun's agent forwarding it),
then SIGKILL some seconds later, then requeues the same command; schedulers send SIGUSR1
shortly before a deadline. While :func:`watch` is active, these signals only set a flag;
the trainer reads it after each optimizer step, writes a mid-epoch checkpoint (position
in the epoch's permutation, RNG states, partial epoch sums) and raises
:class:`~pyro_vae.errors.Preempted`. At most the step in progress when the signal came
is finished, none is lost.

Handlers can be installed only in the main thread of the main interpreter: elsewhere
(a thread of a user's program) :func:`watch` changes nothing and the signals keep their
usual effect.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from pyro_vae import distributed
from pyro_vae.errors import Preempted

#: the signals that ask a run to stop at the next step
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _Flag:
    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.depth = 0


_FLAG = _Flag()


def requested() -> int | None:
    """The number of the signal that asked to stop, or ``None``."""
    return _FLAG.signal_number


def request(signal_number: int = signal.SIGTERM) -> None:
    """Ask the watched training to stop at its next step, as the signal would."""
    _FLAG.signal_number = signal_number


def _handler(signal_number: int, frame: object) -> None:
    _FLAG.signal_number = signal_number


@contextlib.contextmanager
def watch() -> Iterator[bool]:
    """While active, :data:`SIGNALS` set the stop flag instead of ending the process.
    Yields whether handlers were installed; the previous handlers come back on exit,
    and a request the training did not carry out (it stopped with an error first) is
    forgotten, so that it cannot stop a later run of this process after one step."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {}
    try:
        for number in SIGNALS:
            previous[number] = signal.signal(number, _handler)
    except ValueError:  # (not the main interpreter)
        for number, handler in previous.items():
            signal.signal(number, handler)
        yield False
        return
    _FLAG.depth += 1
    try:
        yield True
    finally:
        _FLAG.depth -= 1
        for number, handler in previous.items():
            signal.signal(number, handler)
        if _FLAG.depth == 0:
            clear()


def clear() -> None:
    """Forget a stop request (after the stop was carried out)."""
    _FLAG.signal_number = None


def signal_name(signal_number: int) -> str:
    try:
        return signal.Signals(signal_number).name
    except ValueError:
        return f"signal {signal_number}"


def stop_requested(world: int) -> bool:
    """Whether any of the ``world`` processes was asked to stop (all agree: the same
    answer everywhere; a collective under torchrun)."""
    stop = requested() is not None
    if world > 1:
        stop = distributed.all_sum([float(stop)])[0] > 0
        if stop and requested() is None:
            request()
    return stop


def preempted(
    epoch: int, steps: int | None, steps_per_epoch: int, checkpoint: Path | None
) -> Preempted:
    """The stop a signal asked for, once ``checkpoint`` (``None``: no run folder) holds
    the run's position: after ``epoch`` epochs and ``steps`` steps of the next (``None``:
    at the epoch's end). The request is cleared."""
    number = requested() or 15
    clear()
    if steps is None:
        where = f"after epoch {epoch}"
    else:
        where = f"in epoch {epoch + 1} after step {steps} of {steps_per_epoch}"
    saved = (
        f"the checkpoint ({checkpoint}) holds the run {where}"
        if checkpoint is not None
        else f"stopped {where}"
    )
    return Preempted(
        f"stopped by {signal_name(number)}: {saved}; resume the run "
        f"(`resume`) to continue it from there, bit for bit",
        number,
    )
