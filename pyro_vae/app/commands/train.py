"""``pyro-vae train``: validate everything, lock the run folder, then train into it.

The resume/overwrite policy of a run folder lives here; the run itself is trained by
:func:`pyro_vae.app.training_run.run_training`, and under ``torchrun`` the processes
are coordinated by :mod:`pyro_vae.app.torchrun`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from pyro_vae.app.flags import (
    TRAIN_FLAGS,
    Parser,
    compile_flag,
    estimator_option_flags,
    int_list,
    resolve_config,
    with_config_defaults,
)
from pyro_vae.app.torchrun import Followers, follow, launch_torchrun
from pyro_vae.app.training_run import PreparedRun, Transaction, prepare_run, run_training
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
from pyro_vae.errors import Preempted, UserInputError
from pyro_vae.objectives.registry import ESTIMATORS


def standalone_parser() -> argparse.ArgumentParser:
    """A ``pyro-vae`` parser with ``train`` alone: for the train commands that
    ``reproduce`` writes for its cells (the same flags, defaults and errors)."""
    parser = Parser(prog="pyro-vae")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser))
    return parser


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
    from pyro_vae.app.runs import RunLock, command_line

    if args.nproc is not None:
        return launch_torchrun(args.nproc, argv)
    if distributed.launched_by_torchrun() and not distributed.available():
        distributed.init_from_environment(args.device or "cpu")
        try:
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
        finally:
            distributed.shutdown()
    if args.resume and args.overwrite:
        raise UserInputError(
            "--resume continues the run in --out and --overwrite deletes it: pass one of them"
        )
    if args.out is None:
        if args.resume:
            raise UserInputError("--resume needs the run folder: pass --out")
        args.out = _timestamped_out()
    out: Path = args.out
    start_over = args.resume == "auto"
    if args.resume == "auto":  # requeue-safe: continue a run that has a checkpoint, or start it
        # (a folder stopped before its first checkpoint is started over: nothing was trained)
        args.resume = "always" if (out / "checkpoint.pt").is_file() else None
    prepared = None
    if not args.resume:
        config = resolve_config(args)
        prepared = prepare_run(config)
    with RunLock(out, command_line(argv)):
        return _train_locked(args, argv, out, prepared, start_over, followers)


def _timestamped_out() -> Path:
    """A fresh folder per run when --out is not given: runs/YYYYmmdd-HHMMSS (with -2,
    -3, ... when that exists already)."""
    import time

    stamp = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out, number = stamp, 1
    while out.exists():
        number += 1
        out = stamp.with_name(f"{stamp.name}-{number}")
    return out


def _train_locked(
    args: argparse.Namespace,
    argv: list[str] | None,
    out: Path,
    prepared: PreparedRun | None,
    start_over: bool = False,
    followers: Followers | None = None,
) -> int:
    from pyro_vae.app.runs import (
        check_no_links,
        check_run_data,
        check_run_dir,
        holds_run,
        move_aside,
        recover,
        run_config,
    )
    from pyro_vae.training.checkpoint import load_checkpoint

    check_no_links(out)  # (before anything in it is moved, read or written)
    note = recover(out)
    if note:
        print(note, file=sys.stderr)
    check_run_dir(out, args.resume, args.overwrite, start_over=start_over)
    if args.resume:
        checkpoint = load_checkpoint(out / "checkpoint.pt")  # verified: digest, structure
        config = _resumed_config(args, out, run_config(out, checkpoint))
        if _nothing_to_add(config, checkpoint, out):
            return 0
        prepared = prepare_run(config)
        check_run_data(checkpoint, prepared.data, "resume")
        prepared.start_epoch = checkpoint["epoch"]
    assert prepared is not None  # (prepared before the lock, or from the checkpoint above)
    replacing = args.overwrite and holds_run(out)
    if replacing:
        move_aside(out)
    transaction = Transaction(out, replacing)
    try:
        return run_training(
            prepared, out, args, argv, transaction, None if followers is None else followers.go
        )
    except Preempted:
        transaction.commit()  # the checkpoint holds the position: the run stands
        raise
    except BaseException:
        transaction.rollback()
        raise


def _resumed_config(args: argparse.Namespace, out: Path, saved: RunConfig) -> RunConfig:
    """The run's own config, with --epochs, the final evaluation's settings and the device
    as given (none changes what was trained; a run started on the CPU may go on on a GPU,
    drawing the GPU's noise from there on). The other options may be given too (a requeued
    job repeats its command line) but must equal the run's own: each real change is
    refused, naming the saved and the given value."""
    given = resolve_config(args, base=saved)
    free = {name: getattr(saved.train, name) for name in _FREE_ON_RESUME}
    changed = _flag_differences(
        saved, dataclasses.replace(given, train=dataclasses.replace(given.train, **free))
    )
    if changed:
        raise UserInputError(
            f"--resume continues {out} with its own settings; only --epochs, --eval-samples, "
            f"--eval-images and --device may change, and these differ: "
            f"{'; '.join(changed)} (start a new run for other settings)"
        )
    return given


#: settings a resumed run may change: how long it trains, how it is evaluated at the end,
#: where it runs (the checkpoint loads on the CPU and moves to the device)
_FREE_ON_RESUME = ("epochs", "eval_samples", "eval_images", "device")


def _flag_differences(saved: RunConfig, given: RunConfig) -> list[str]:
    """``--flag: saved X, given Y`` for each setting that differs (config keys without a
    flag are named as ``section.key``)."""
    names = {value: flag for flag, value in TRAIN_FLAGS.items()}

    def shown(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)

    result = []
    for section in ("data", "model", "train"):
        old, new = saved.section(section), given.section(section)
        for name in old:
            if old[name] != new[name]:
                flag = names.get((section, name))
                label = f"--{flag.replace('_', '-')}" if flag else f"{section}.{name}"
                result.append(f"{label}: saved {shown(old[name])}, given {shown(new[name])}")
    return result


def _nothing_to_add(config: RunConfig, checkpoint: dict[str, Any], out: Path) -> bool:
    """A finished run asked to go no further: say so, and change nothing. Finished means
    trained, evaluated and reported, the report written after the checkpoint and the
    evaluation (a run stopped between those, e.g. killed while writing its plots, is
    finished by running it again: its report is refreshed)."""
    from pyro_vae.app.runs import evaluation_damage, repair_metrics

    done = checkpoint["epoch"]
    finished = checkpoint["stopped_early"] or done >= config.train.epochs
    evaluation, report = out / "evaluation.json", out / "report.md"
    evaluated = not config.train.eval_samples or evaluation.exists()
    if finished and evaluated and evaluation.exists():
        damage = evaluation_damage(evaluation)
        if damage is not None:  # evaluated again, written whole
            print(f"note: {damage}: the run is evaluated again", file=sys.stderr)
            evaluated = False
    if not (finished and evaluated and report.exists()):
        return False
    note = repair_metrics(out, checkpoint["history"])
    if note:
        print(note, file=sys.stderr)
    written_before = [p for p in (out / "checkpoint.pt", evaluation) if p.exists()]
    if any(report.stat().st_mtime_ns < p.stat().st_mtime_ns for p in written_before):
        return False
    why = "stopped early" if checkpoint["stopped_early"] else f"trained {done} epochs"
    print(
        f"{out} is finished ({why}, evaluated, report written): nothing to do; pass a larger "
        f"--epochs to train further"
    )
    return True
