"""The commands of ``pyro-vae``, one module each, found through :data:`COMMANDS`.

Each module has ``add_parser(commands)`` (its subcommand and flags, on argparse's
subparsers) and ``run(args, argv) -> int`` (the exit status). The order of the table is
the order of ``pyro-vae --help`` and of the docs' CLI reference. Heavy modules are
imported inside the ``run`` functions, so that building the parser (``--help``) is fast.
"""

from __future__ import annotations

from types import ModuleType

from pyro_vae.app.commands import (
    compare,
    diagnose,
    estimators,
    evaluate,
    reproduce,
    sample,
    sweep,
    train,
)

__all__ = ["COMMANDS"]

#: command name -> its module (``add_parser`` and ``run``)
COMMANDS: dict[str, ModuleType] = {
    "train": train,
    "evaluate": evaluate,
    "sample": sample,
    "reproduce": reproduce,
    "compare": compare,
    "sweep": sweep,
    "diagnose": diagnose,
    "estimators": estimators,
}
