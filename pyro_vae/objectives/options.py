"""An estimator's options: typed settings besides its number of particles.

An :class:`Option` says what one keyword of an estimator's builder accepts, checks a
value given in Python or a JSON config (:meth:`Option.check`) and parses one given on the
command line (:meth:`Option.parse`). This module imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pyro_vae.errors import UserInputError

OPTION_TYPES: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str"}


@dataclass(frozen=True)
class Option:
    """One setting of an estimator besides its number of particles.

    :param name: the keyword its builder takes (``alpha``).
    :param type: ``bool``, ``int``, ``float`` or ``str``.
    :param default: its value when not given.
    :param help: one line: what it does.
    :param minimum: the smallest value allowed (numbers).
    :param maximum: the largest value allowed (numbers).
    :param choices: the values allowed (strings).
    :param refused: ``(value, why)`` pairs: values the estimator refuses, with the reason
        (renyi's ``alpha = 1`` is the ELBO).
    """

    name: str
    type: type
    default: Any
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    refused: tuple[tuple[Any, str], ...] = ()

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise UserInputError(
                f"option {self.name!r} has type {self.type!r}: use one of "
                f"{', '.join(OPTION_TYPES.values())}"
            )

    def check(self, given: Any, owner: str) -> Any:
        """``given`` as this option's type, or one line naming what is wrong with it."""
        value: Any = given
        what = f"{owner}'s option {self.name}"
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _of_type(value, self.type):
            raise UserInputError(f"{what} must be a {OPTION_TYPES[self.type]}, got {value!r}")
        if self.type is float and not math.isfinite(value):
            raise UserInputError(f"{what} must be finite, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise UserInputError(f"{what} must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise UserInputError(f"{what} must be <= {self.maximum:g}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise UserInputError(f"{what} must be one of {', '.join(self.choices)}, got {value!r}")
        for bad, why in self.refused:
            if value == bad:
                raise UserInputError(f"{what} = {value!r}: {why}")
        return value

    def parse(self, text: str, owner: str) -> Any:
        """The value a command-line string ``text`` gives this option (checked)."""
        value: Any = text
        try:
            if self.type is bool:
                lowered = text.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value = lowered in ("true", "1", "yes")
            elif self.type is int:
                value = int(text)
            elif self.type is float:
                value = float(text)
        except ValueError:
            raise UserInputError(
                f"{owner}'s option {self.name} must be a {OPTION_TYPES[self.type]}, got {text!r}"
            ) from None
        return self.check(value, owner)

    def describe(self) -> str:
        """``name (type, default D): help``, for ``--help`` and the docs."""
        return f"{self.name} ({OPTION_TYPES[self.type]}, default {self.default!r}): {self.help}"


def _of_type(value: Any, kind: type) -> bool:
    """``isinstance(value, kind)``, a bool being no number (and no narrowing for mypy)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
