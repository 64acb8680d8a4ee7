"""``pyro-vae sweep``: one run per point of a grid file, locked, resumable."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pyro_vae.app.flags import executor_flags, executor_from_flags
from pyro_vae.errors import UserInputError


def add_parser(commands: Any) -> None:
    """``pyro-vae sweep`` and its flags, on the subparsers ``commands``."""
    parser = commands.add_parser(
        "sweep",
        help="train one run per point of a grid over config keys, e.g. estimator x seed",
        description="Train one run per point of the cartesian product of the grid file's "
        'lists, e.g. {"base": {"data": {"limit": 200}}, "grid": {"train.estimator": '
        '["mc", "analytic"], "train.seed": [0, 1]}}; every run is checked before any is '
        "trained, trains into its own run folder under --out, and sweep.json/.md tabulate them.",
    )
    parser.add_argument("--grid", type=Path, required=True, help="JSON file: base and grid")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and tables")
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep in --out (same --grid)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    executor_flags(parser, gpus=True)


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    from pyro_vae.app.lock import RunLock
    from pyro_vae.app.runs import command_line, is_empty
    from pyro_vae.app.sweep import check_runs, expand_grid, load_grid, run_sweep
    from pyro_vae.io import atomic_write_json, read_json

    if args.out.exists() and not args.out.is_dir():
        raise UserInputError(f"--out {args.out} is a file: pass a folder")
    grid = load_grid(args.grid)
    runs = expand_grid(grid, source=f"grid file {args.grid}")
    cuda = any(run.config.train.device == "cuda" for run in runs)
    executor = executor_from_flags(args, gpus_per_run=1.0 if cuda else 0.0)
    from pyro_vae.app.training_run import DataCache

    cache = DataCache()  # (the checks read each data set once, the runs reuse it)
    check_runs(runs, check_device=args.executor == "serial", cache=cache)
    with RunLock(args.out, command_line(argv)):
        saved = args.out / "grid.json"
        if args.resume:
            if not saved.exists():
                raise UserInputError(f"{args.out} holds no sweep to resume: run without --resume")
            if read_json(saved, "the sweep's grid.json") != json.loads(json.dumps(grid)):
                raise UserInputError(
                    f"{args.out} holds a sweep of another grid: pass its grid to resume it "
                    f"({saved}), or another --out"
                )
        elif not is_empty(args.out):
            raise UserInputError(
                f"{args.out} is not empty: choose a new or empty folder (--resume continues "
                f"a sweep there with the same grid)"
            )
        else:
            atomic_write_json(grid, saved)
        with executor:
            result = run_sweep(
                runs,
                args.out,
                executor,
                progress=not args.quiet,
                command=command_line(argv),
                grid=grid,
                cache=cache,
            )
    for run in result["runs"]:
        extra = (
            f", log p(x) {run['test_log_likelihood']:.3f}" if "test_log_likelihood" in run else ""
        )
        seconds = run["train_seconds"]
        print(f"{run['name']}: test ELBO {run['test_elbo']:.3f}{extra}, {seconds:.1f} s training")
    print(f"sweep: {args.out / 'sweep.md'}")
    return 0
