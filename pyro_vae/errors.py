"""Errors that the command line reports as one line with exit status 2."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user: the message names the problem and the fix.

    The CLI prints ``error: <message>`` and exits with status 2, no traceback.
    """


class DataError(UserInputError):
    """A data set is missing, truncated, corrupt, or outside the likelihood's support."""


class CheckpointError(UserInputError):
    """A checkpoint is missing, truncated or not a pyro-vae checkpoint."""


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN or infinite; the parameters were not updated."""


class Preempted(Exception):
    """Training was asked to stop by a signal (SIGTERM, SIGUSR1: a scheduler preempting
    the job): the current step was finished and a checkpoint holds the position in the
    epoch; resuming continues from there, bit for bit.

    ``status`` is the exit status the command line ends with: 128 + the signal's number
    (143 for SIGTERM, 138 for SIGUSR1), as a shell reports a process the signal ended.
    """

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.status = 128 + signal_number


class DistributedError(RuntimeError):
    """Another training process was lost or stopped answering (an environment failure:
    exit status 1); the last checkpoint is intact."""
