"""The ``pyro-vae`` entry point: the parser built from the command table, and each
failure mapped to one line and an exit status.

The commands (``train``, ``evaluate``, ``sample``, ``reproduce``, ``compare``, ``sweep``,
``diagnose``, ``estimators``) are modules of :mod:`pyro_vae.app.commands`, found through
its ``COMMANDS`` table; each maps its flags onto :mod:`pyro_vae.config` and calls library
code. Bad input ends with one line on stderr and exit status 2; a non-finite loss, a lost
process or a failure of the machine (full disk, no memory) with one line and status 1; a
preempted run with its line and the signal's status. Heavy modules are imported inside
the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import errno
import re
import sys

from pyro_vae import __version__
from pyro_vae.app.commands import COMMANDS
from pyro_vae.app.flags import TRAIN_FLAGS, Parser
from pyro_vae.errors import DistributedError, NonFiniteError, Preempted, UserInputError

__all__ = ["as_flags", "build_parser", "environment_problem", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-vae`` argument parser: every command of the table and its flags, with
    the config dataclasses' defaults in ``--help`` (the docs' CLI reference prints it)."""
    parser = Parser(
        prog="pyro-vae",
        description="Train, evaluate and sample variational autoencoders written as Pyro "
        "programs. ELBOs and log-likelihoods are nats per data point, higher is better.",
    )
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``pyro-vae`` command: parse ``argv`` (default ``sys.argv[1:]``), run it, and
    return the exit status (2 for bad input, printed as one line; 1 when stopped)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if "torch" not in sys.modules:  # (torch under a low `ulimit -v` aborts, unexplained)
        from pyro_vae.resources import address_space_problem

        limit = address_space_problem()
        if limit is not None:
            _say(f"pyro-vae {args.command}: stopped: {limit}")
            return 1
    try:
        return _run_command(args, argv)
    finally:
        # under torchrun the process group goes after the line saying why a process
        # stopped is printed (were the teardown to stall, the line is out already)
        distributed = sys.modules.get("pyro_vae.distributed")
        if distributed is not None:
            distributed.shutdown()


def _run_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The command's exit status; its errors as one line (see :func:`main`)."""
    try:
        return int(COMMANDS[args.command].run(args, argv))
    except UserInputError as error:
        _say(f"pyro-vae {args.command}: error: {as_flags(str(error))}")
        return 2
    except NonFiniteError as error:
        _say(f"pyro-vae {args.command}: stopped: {as_flags(str(error))}")
        return 1
    except Preempted as stop:
        _say(f"pyro-vae {args.command}: {_preempted_line(str(stop))}")
        return stop.status
    except DistributedError as error:
        _say(f"pyro-vae {args.command}: stopped: {as_flags(str(error))}")
        return 1
    except KeyboardInterrupt:
        _say(f"pyro-vae {args.command}: interrupted")
        return 130
    except (OSError, MemoryError, RuntimeError, ImportError) as error:
        from pyro_vae import distributed
        from pyro_vae.app.torchrun import LAUNCHED_BY_NPROC

        lost = distributed.lost_peer(error)
        if lost is not None:
            import os

            # under --nproc the launcher names the lost process (it knows which)
            if not (lost[1] == "lost" and os.environ.get(LAUNCHED_BY_NPROC)):
                _say(f"pyro-vae {args.command}: stopped: {_preempted_line(lost[0])}")
            return 1
        problem = environment_problem(error)
        if problem is None:
            raise
        message, status = problem
        _say(f"pyro-vae {args.command}: {message}")
        return status


def _say(line: str) -> None:
    """An error's one line on stderr: from the only process, or under torchrun from the
    first alone (the others stop with the same status, quietly)."""
    import os

    if os.environ.get("RANK", "0") in ("0", "") or "WORLD_SIZE" not in os.environ:
        print(line, file=sys.stderr)


def _preempted_line(message: str) -> str:
    """The library's stop message in the command line's words: run the same command."""
    return (
        as_flags(message)
        .replace("resume the run (`resume`)", "run the same command with --resume auto")
        .replace("resume the run", "run the same command with --resume auto")
    )


#: library names of settings that the command line spells differently
_SETTING_FLAGS = {field: flag for flag, (_, field) in TRAIN_FLAGS.items()} | {
    "out": "out",
    "overwrite": "overwrite",
    "n": "n",
}


def as_flags(message: str) -> str:
    """A library message in the command line's words: the library names a setting in
    backticks, `lr` or `estimator='mc'`; the command line prints --lr, --estimator mc."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        if name not in _SETTING_FLAGS:
            return str(match.group(0))
        text = "--" + _SETTING_FLAGS[name].replace("_", "-")
        if value is not None:
            text += " " + value.strip("'\"")
        return text

    return re.sub(r"`([a-z_]+)(?:=([^`]+))?`", flag, message)


#: errno -> what the environment did, with the fix; exit status 1 (not bad input)
_ENVIRONMENT = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (failing disk?)",
    errno.ENOMEM: "out of memory",
    errno.EFBIG: "file size limit exceeded (ulimit -f, or the file system's largest file)",
}


def environment_problem(error: BaseException) -> tuple[str, int] | None:
    """One line and an exit status for a failure of the machine rather than of the
    input: a full disk, a read-only file system, no memory (status 1); a path that cannot
    be used (status 2). ``None`` for anything else (a bug: its traceback is shown)."""
    filename = getattr(error, "filename", None)
    where = f" ({filename})" if filename else ""
    if isinstance(error, OSError):
        if error.errno in _ENVIRONMENT:
            return (
                f"stopped: {_ENVIRONMENT[error.errno]}{where}; files already written are "
                f"intact: free space or fix the file system, then run again (--resume for "
                f"a training run)",
                1,
            )
        return (
            f"error: {error.strerror or error}{where}: check the paths and permissions",
            2,
        )
    text = str(error)
    if isinstance(error, ImportError):
        if "failed to map segment" in text or "cannot allocate memory" in text.lower():
            return (
                f"stopped: out of memory while loading a library ({text.splitlines()[0][:120]}):"
                f" raise the memory limit (ulimit -v) or free memory",
                1,
            )
        return None
    if (
        isinstance(error, MemoryError)
        or "can't allocate memory" in text
        or ("out of memory" in text.lower())
    ):
        return (
            "stopped: out of memory; files already written are intact: lower --batch-size, "
            "--particles or the model's sizes",
            1,
        )
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
