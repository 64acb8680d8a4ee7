"""``pyro-vae train``: its flags, and the run they ask for.

The flags become a :class:`~pyro_vae.app.run_folder.RunRequest`, which
:func:`~pyro_vae.app.run_folder.train_run` carries out under the run folder's
resume/overwrite policy; under ``torchrun`` the processes are coordinated by
:mod:`pyro_vae.app.torchrun`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from pyro_vae.app.flags import (
    compile_flag,
    estimator_option_flags,
    int_list,
    resolve_config,
    with_config_defaults,
)
from pyro_vae.app.torchrun import Followers, follow, launch_torchrun
from pyro_vae.choices import (
    ACTIVATIONS,
    BINARIZATIONS,
    DATASETS,
    GUIDES,
    LIKELIHOODS,
    LR_SCHEDULES,
    NETWORKS,
    OPTIMIZERS,
)
from pyro_vae.config import (
    PROTOCOLS,
    RunConfig,
)
from pyro_vae.objectives.registry import ESTIMATORS


def add_parser(commands: Any) -> None:
    """``pyro-vae train`` and its flags, on the subparsers ``commands``."""
    parser = commands.add_parser(
        "train",
        help="train a VAE and write a run folder (metrics, checkpoint, plots, report)",
        description="Train a VAE by SVI. Defaults: the IWAE paper's MLP (2x200 tanh, latent "
        "50), Bernoulli likelihood, dynamic binarization, Adam 1e-3, batch 128; several "
        "latent layers use the bottom-up guide. Requeue-safe: the same command with "
        "--resume auto starts the run, or continues it after an interruption.",
    )
    _data_flags(parser)
    _model_flags(parser)
    _training_flags(parser)
    _folder_flags(parser)
    with_config_defaults(parser)


def _data_flags(parser: argparse.ArgumentParser) -> None:
    """The config file, the protocol and the data."""
    parser.add_argument("--config", type=Path, help="JSON file with sections model/data/train")
    parser.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        help="a paper's training protocol, under --config and the flags: iwae = Burda et al. "
        "(2016): MNIST, batch 20, Adam epsilon 1e-4, --lr-schedule iwae over 3280 passes, "
        "log p(x) with K=5000 on the whole test set",
    )
    parser.add_argument("--dataset", choices=DATASETS, help="data set")
    parser.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="your own data instead: a .npy file (points in rows), a .npz file (arrays train "
        "and test) or a folder of images (subfolders train/ and test/ where present); "
        "without a test set, 10%% of the points are held out",
    )
    parser.add_argument("--data-dir", help="folder of IDX files for mnist/fashion-mnist/kmnist")
    parser.add_argument("--likelihood", choices=LIKELIHOODS, help="decoder likelihood")
    parser.add_argument("--binarize", choices=BINARIZATIONS, help="binarization of images")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    """The estimator and the model."""
    parser.add_argument(
        "--estimator",
        metavar="NAME|PATH",
        help=f"one of {', '.join(ESTIMATORS)} (mc is Trace_ELBO; see `pyro-vae estimators`), "
        f"or the import path package.module:Name of your own estimator or of a Pyro ELBO "
        f"class (pyro.infer:RenyiELBO)",
    )
    parser.add_argument("--particles", type=int, help="samples of z per data point (K)")
    estimator_option_flags(parser)
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="your own model: the import path package.module:factory of a callable that "
        "takes the data shape and returns model and guide (the model flags then do not apply)",
    )
    parser.add_argument(
        "--model-option",
        action="append",
        metavar="NAME=VALUE",
        help="a keyword for --model's factory (VALUE read as JSON, else as a string); repeatable",
    )
    parser.add_argument(
        "--latent-dims", type=int_list, help="latent size, e.g. 50; several layers: 100,50"
    )
    parser.add_argument("--hidden", type=int_list, help="hidden widths, e.g. 200,200")
    parser.add_argument("--activation", choices=ACTIVATIONS, help="hidden nonlinearity")
    parser.add_argument("--network", choices=NETWORKS, help="network kind")
    parser.add_argument(
        "--guide",
        choices=GUIDES,
        help="inference order with several latent layers (--latent-dims 100,50): bottom-up "
        "keeps both layers in use without warm-up, top-down loses one without it (the "
        "closed-form KL needs top-down) (default: bottom-up)",
    )
    parser.add_argument("--free-bits", type=float, metavar="NATS", help="free bits per layer")


def _training_flags(parser: argparse.ArgumentParser) -> None:
    """The optimization, the seed and the device."""
    parser.add_argument("--epochs", type=int, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, help="data points per step")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer")
    parser.add_argument("--clip-norm", type=float, help="clipped_adam: gradient clip")
    parser.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="per epoch; iwae: the IWAE paper's 1e-3 * 10^(-i/7) for 3^i passes, i = 0..7",
    )
    parser.add_argument("--adam-epsilon", type=float, help="Adam's epsilon")
    parser.add_argument("--lr-gamma", type=float, help="exponential schedule: factor per epoch")
    parser.add_argument("--kl-warmup", type=float, metavar="EPOCHS", help="KL warm-up epochs")
    parser.add_argument("--validation-size", type=int, help="training points held out")
    parser.add_argument("--early-stopping", type=int, metavar="PATIENCE", help="epochs")
    parser.add_argument("--limit", type=int, help="use only this many train/test points")
    parser.add_argument(
        "--monitor-images",
        type=int,
        metavar="N",
        help="test images evaluated after every epoch, a fixed random subset",
    )
    parser.add_argument("--seed", type=int, help="seeds torch, numpy, python, data order")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="device")
    compile_flag(parser, "each step's loss and gradients")


def _folder_flags(parser: argparse.ArgumentParser) -> None:
    """The run folder, the final evaluation, the output and the processes."""
    parser.add_argument("--out", type=Path, help="run folder (default: a new runs/YYYYmmdd-HHMMSS)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="always",
        choices=("always", "auto"),
        help="continue the run in --out; --resume auto: continue it if it has a checkpoint, "
        "else start it (one job script for first start and requeue). Options equal to the "
        "run's own are accepted; --epochs may grow",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.add_argument(
        "--eval-samples",
        type=int,
        metavar="K",
        help="K of the final importance-sampled log p(x) (IWAE paper: 5000; 0 skips it); "
        "the estimated time is printed before it starts",
    )
    parser.add_argument(
        "--eval-images",
        type=int,
        metavar="N",
        help="test images for it, a fixed random subset (the IWAE paper: all of them)",
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log each epoch's scalars and the image grids to RUN/tensorboard "
        "(tensorboard --logdir runs)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel in N processes on this machine (launches torchrun "
        "--standalone --nproc-per-node N; for several machines run torchrun yourself)",
    )


def run(
    args: argparse.Namespace, argv: list[str] | None, followers: Followers | None = None
) -> int:
    """``pyro-vae train``: validate everything, lock the run folder, then write.

    Order: options and config (no file touched), data and model (read only), memory;
    then the folder's lock; what the folder holds; for --resume the verified checkpoint
    and its own config; only then any write. Until the first epoch of this command is
    checkpointed, a failure takes back what the command wrote (and --overwrite puts the
    old run back); after it, the run is left resumable. Under torchrun, the first process
    does all this and tells the others (its ``followers``) what to train.
    """
    from pyro_vae import distributed
    from pyro_vae.app.runs import command_line

    if args.nproc is not None:
        return launch_torchrun(args.nproc, argv)
    if distributed.launched_by_torchrun() and not distributed.available():
        # (the process group is destroyed by the entry point, after an error is printed)
        distributed.init_from_environment(args.device or "cpu")
        if distributed.restart_count() > 0 and not args.resume:
            args.resume = "auto"  # an elastic restart continues from the last checkpoint
        if not distributed.is_main():
            return follow(args)
        followers, status = Followers(), 2
        try:
            status = run(args, argv, followers)
            return status
        finally:
            followers.stop(status)  # (no-op once they were sent to train)
    from pyro_vae.app.run_folder import RunRequest, train_run

    return train_run(
        RunRequest(
            settings=FlagSettings(args),
            out=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            quiet=args.quiet,
            tensorboard=args.tensorboard,
            command=command_line(argv),
        ),
        followers,
    )


@dataclasses.dataclass(frozen=True)
class FlagSettings:
    """The run's config from ``train``'s flags: over the saved run's own when resuming
    (the flags not given keep its settings), over the defaults when starting."""

    args: argparse.Namespace

    def __call__(self, saved: RunConfig | None) -> RunConfig:
        return resolve_config(self.args, base=saved)
