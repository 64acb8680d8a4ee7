"""``pyro-vae reproduce``: train the cells of a published table, each a ``train`` run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pyro_vae.app.flags import executor_flags, executor_from_flags, resolve_config
from pyro_vae.choices import (
    DATASETS,
)
from pyro_vae.errors import UserInputError


def add_parser(commands: Any) -> None:
    """``pyro-vae reproduce`` and its flags, on the subparsers ``commands``."""
    parser = commands.add_parser(
        "reproduce",
        help="train the cells of a published table and put the paper's numbers beside ours",
        description="iwae-table1: the MNIST cells of Table 1 of Burda et al. (2016) (1 and 2 "
        "stochastic layers, VAE and IWAE objectives, k = 1, 5, 50), each under the paper's "
        "protocol (--protocol iwae: 3280 passes, K=5000 log p(x)) in its own resumable run "
        "folder OUT/CELL; run the same command again to continue. --epochs gives a partial "
        "reproduction; the report then projects what the full protocol costs. The cells "
        "train one after another, or in parallel as Ray tasks (--executor ray), each "
        "retried task resuming its cell; the cells' folders are the table's state, so on a "
        "cluster --out must be on a file system every node sees.",
    )
    parser.add_argument("table", choices=("iwae-table1",), help="what to reproduce")
    parser.add_argument("--out", type=Path, required=True, help="folder of the cells' runs")
    parser.add_argument("--cells", help="comma-separated cells, e.g. 1l-vae-k1 (default: all)")
    parser.add_argument("--data-dir", help="folder of the MNIST IDX files (else downloaded)")
    parser.add_argument(
        "--epochs", type=int, help="passes per cell, for a partial run (default: the 3280)"
    )
    parser.add_argument("--eval-samples", type=int, help="K of log p(x) (default: 5000)")
    parser.add_argument("--eval-images", type=int, help="test images (default: all)")
    parser.add_argument("--dataset", choices=DATASETS, help="(default: mnist)")
    parser.add_argument("--limit", type=int, help="use only this many train/test points")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="where each cell trains (default: cpu)"
    )
    executor_flags(parser, gpus=True)


def _train_cell(argv: list[str]) -> int:
    """``pyro-vae train ARGV`` for one cell of ``reproduce``: a top-level function, so that
    a Ray task can run it; bad input raises (one line, through the executor)."""
    from pyro_vae.app.commands.train import run as train
    from pyro_vae.app.commands.train import standalone_parser

    return train(standalone_parser().parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Each cell is a ``train --protocol iwae --resume auto`` of its own folder (started,
    continued or left as it is), then the table is gathered from the folders."""
    from pyro_vae.app.reproduce import gather, markdown, select_cells
    from pyro_vae.app.runs import holds_run
    from pyro_vae.io import atomic_write_json, atomic_write_text

    cells = select_cells(args.table, args.cells)
    if holds_run(args.out):
        raise UserInputError(
            f"--out {args.out} holds a training run: reproduce keeps a table of cells, each "
            f"a run folder of its own, in a folder of its own; choose another --out"
        )
    for cell in cells:
        if (args.out / cell.name).is_symlink():
            raise UserInputError(
                f"{args.out / cell.name} is a symbolic link: pyro-vae never writes through a "
                f"link; remove it, or choose another --out"
            )
    from pyro_vae.app.commands.train import standalone_parser

    parser = standalone_parser()
    options = []
    for flag in ("data_dir", "epochs", "eval_samples", "eval_images", "dataset", "limit", "device"):
        value = getattr(args, flag)
        if value is not None:
            options += [f"--{flag.replace('_', '-')}", str(value)]
    commands = []
    for cell in cells:
        argv = [
            "train", "--protocol", "iwae",
            "--latent-dims", ",".join(map(str, cell.latent_dims)),
            "--estimator", cell.estimator, "--particles", str(cell.k),
            *options, "--resume", "auto", "--out", str(args.out / cell.name),
            *(["--quiet"] if args.quiet else []),
        ]  # fmt: skip
        commands.append(argv)
    for argv in commands:  # every cell's command parses before any cell trains
        parser.parse_args(argv)
    executor = executor_from_flags(args, gpus_per_run=1.0 if args.device == "cuda" else 0.0)
    if executor.name == "serial":
        for number, (cell, argv) in enumerate(zip(cells, commands), start=1):
            print(f"cell {number}/{len(cells)}: {cell.name} (paper NLL {cell.paper_nll:.2f})")
            executor.map(_train_cell, [argv])  # with the torch threads of a Ray task
    else:  # one Ray task per cell; a retried task resumes its cell (--resume auto)
        # the data once here first: a download (no --data-dir) must not race in N tasks
        first = resolve_config(parser.parse_args(commands[0]))
        first.data.load(first.train.seed)
        quiet = [argv if "--quiet" in argv else [*argv, "--quiet"] for argv in commands]
        print(f"{len(cells)} cells as Ray tasks ({', '.join(cell.name for cell in cells)}) ...")
        with executor:
            executor.map(_train_cell, quiet, log=print, labels=[cell.name for cell in cells])
    rows = gather(cells, args.out)
    atomic_write_json({"table": args.table, "rows": rows}, args.out / f"{args.table}.json")
    report = markdown(args.table, rows)
    atomic_write_text(report, args.out / f"{args.table}.md")
    print(report)
    return 0
