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
