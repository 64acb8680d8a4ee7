"""``pyro-vae reproduce``: train the cells of a published table, each a ``train`` run."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_vae.app.flags import executor_flags, executor_from_flags, with_flags
from pyro_vae.app.reproduce import Cell
from pyro_vae.app.run_folder import RunRequest, train_run
from pyro_vae.choices import (
    DATASETS,
)
from pyro_vae.config import RunConfig, with_protocol
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


#: reproduce's flags that set a cell's training run, as train's flags do
CELL_FLAGS = ("data_dir", "epochs", "eval_samples", "eval_images", "dataset", "limit", "device")


@dataclass(frozen=True)
class CellSettings:
    """A cell's run config: the IWAE protocol, the cell's latent layers, estimator and k,
    and reproduce's flags (``options``, by :data:`CELL_FLAGS` name), over the saved run's
    own settings when the cell resumes, as ``train --protocol iwae`` with those flags
    would build it (picklable: a Ray task's argument)."""

    cell: Cell
    options: tuple[tuple[str, Any], ...]

    def __call__(self, saved: RunConfig | None) -> RunConfig:
        cell = {"latent_dims": self.cell.latent_dims, "particles": self.cell.k}
        given = {**cell, "estimator": self.cell.estimator, **dict(self.options)}
        return with_flags(with_protocol(saved or RunConfig(), "iwae"), given)


def _train_cell(request: RunRequest) -> int:
    """One cell of ``reproduce``: a top-level function, so that a Ray task can run it;
    bad input raises (one line, through the executor)."""
    return train_run(request)


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
    options = tuple(
        (flag, getattr(args, flag)) for flag in CELL_FLAGS if getattr(args, flag) is not None
    )
    requests = [
        RunRequest(
            settings=CellSettings(cell, options),
            out=args.out / cell.name,
            resume="auto",
            quiet=args.quiet,
            command=_cell_command(cell, args),
        )
        for cell in cells
    ]
    for request in requests:  # every cell's config builds (validated) before any cell trains
        request.settings(None)
    executor = executor_from_flags(args, gpus_per_run=1.0 if args.device == "cuda" else 0.0)
    if executor.name == "serial":
        for number, (cell, request) in enumerate(zip(cells, requests), start=1):
            print(f"cell {number}/{len(cells)}: {cell.name} (paper NLL {cell.paper_nll:.2f})")
            executor.map(_train_cell, [request])  # with the torch threads of a Ray task
    else:  # one Ray task per cell; a retried task resumes its cell (--resume auto)
        # the data once here first: a download (no --data-dir) must not race in N tasks
        first = requests[0].settings(None)
        first.data.load(first.train.seed)
        quiet = [dataclasses.replace(request, quiet=True) for request in requests]
        print(f"{len(cells)} cells as Ray tasks ({', '.join(cell.name for cell in cells)}) ...")
        with executor:
            executor.map(_train_cell, quiet, log=print, labels=[cell.name for cell in cells])
    rows = gather(cells, args.out)
    atomic_write_json({"table": args.table, "rows": rows}, args.out / f"{args.table}.json")
    report = markdown(args.table, rows)
    atomic_write_text(report, args.out / f"{args.table}.md")
    print(report)
    return 0


def _cell_command(cell: Cell, args: argparse.Namespace) -> str:
    """The command line recorded in a cell's lock: the reproduce command, for that cell."""
    import shlex

    words = ["pyro-vae", "reproduce", args.table, "--cells", cell.name, "--out", str(args.out)]
    for flag in CELL_FLAGS:
        if getattr(args, flag) is not None:
            words += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return shlex.join(words)
