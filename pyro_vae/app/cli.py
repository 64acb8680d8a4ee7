"""The ``pyro-vae`` command line: ``train``, ``evaluate``, ``sample``.

Intentionally thin: it maps flags onto :mod:`pyro_vae.config` and calls library code.
Bad input ends with one line on stderr and exit status 2; a non-finite loss with one
line and status 1. Heavy modules are imported inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from pyro_vae import __version__
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
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    legacy_train_section,
    with_protocol,
)
from pyro_vae.errors import DistributedError, NonFiniteError, Preempted, UserInputError
from pyro_vae.objectives.registry import ESTIMATORS
from pyro_vae.resources import check_device


def _with_default(text: str, default: Any) -> str:
    """``text`` and the flag's default, unless the text states it already or the flag is
    unset or off; a list as the flag takes it (``1,3,10``)."""
    if "default" in text or default is None or default is False or default == argparse.SUPPRESS:
        return text
    if isinstance(default, (tuple, list)):
        default = ",".join(map(str, default))
    return f"{text} (default: {str(default).replace('%', '%%')})".strip()


class _Help(argparse.HelpFormatter):
    """Every flag's default in ``--help``, once (:func:`_with_default`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return _with_default(action.help or "", action.default)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2), and every
    flag's default shows in ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.help is None and action.option_strings:  # a flag without help: its default
            action.help = _with_default("", action.default) or None
        return action

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _estimator_option_flags(parser: argparse.ArgumentParser) -> None:
    """``--estimator-option NAME=VALUE`` (repeatable) and its shorthand ``--alpha``."""
    parser.add_argument(
        "--estimator-option",
        action="append",
        metavar="NAME=VALUE",
        help="an option of the estimator, e.g. alpha=0.3 for renyi (`pyro-vae estimators` "
        "lists each one's); repeatable",
    )
    parser.add_argument("--alpha", type=float, help="renyi's order: --estimator-option alpha=ALPHA")


def estimator_options(args: argparse.Namespace) -> list[str]:
    """The ``NAME=VALUE`` pairs of ``--estimator-option`` and its shorthands."""
    pairs = list(getattr(args, "estimator_option", None) or [])
    if getattr(args, "alpha", None) is not None:
        pairs.append(f"alpha={args.alpha!r}")
    return pairs


def model_options(pairs: list[str] | None) -> dict[str, Any]:
    """``--model-option NAME=VALUE`` pairs as keywords (VALUE as JSON, else a string)."""
    import json

    values: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip().isidentifier():
            raise UserInputError(f"--model-option {pair!r} is not NAME=VALUE: write e.g. width=64")
        try:
            values[name.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[name.strip()] = text
    return values


def _int_list(text: str) -> tuple[int, ...]:
    """``"100,50"`` -> ``(100, 50)``; an empty item (``"5,,3"``, ``"5,"``) is an error."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.lstrip("+-").isdigit() for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, with no empty item, got {text!r}"
        )
    return tuple(int(part) for part in parts)


# flag -> (section, field): the flags of `train` that map onto the config
_TRAIN_FLAGS = {
    "dataset": ("data", "dataset"),
    "data_dir": ("data", "data_dir"),
    "binarize": ("data", "binarize"),
    "validation_size": ("data", "validation_size"),
    "limit": ("data", "limit"),
    "likelihood": ("model", "likelihood"),
    "latent_dims": ("model", "latent_dims"),
    "hidden": ("model", "hidden"),
    "activation": ("model", "activation"),
    "network": ("model", "network"),
    "guide": ("model", "guide"),
    "free_bits": ("train", "free_bits"),
    "estimator": ("train", "estimator"),
    "particles": ("train", "particles"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "optimizer": ("train", "optimizer"),
    "lr_schedule": ("train", "lr_schedule"),
    "kl_warmup": ("train", "kl_warmup_epochs"),
    "early_stopping": ("train", "early_stopping_patience"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "compile": ("train", "compile"),
    "monitor_images": ("train", "monitor_images"),
    "lr_gamma": ("train", "lr_gamma"),
    "clip_norm": ("train", "clip_norm"),
    "adam_epsilon": ("train", "adam_epsilon"),
    "eval_samples": ("train", "eval_samples"),
    "eval_images": ("train", "eval_images"),
}


def _config_default(flag: str) -> Any:
    """The default of a train flag: the config dataclass's, so --help never drifts."""
    section, name = _TRAIN_FLAGS[flag]
    value = getattr(getattr(RunConfig(), section), name)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return value


def _with_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" from the config dataclasses to each train flag's help."""
    for action in parser._actions:
        if action.dest in _TRAIN_FLAGS and action.help and "default" not in action.help:
            default = _config_default(action.dest)
            shown = default
            if default is None:
                shown = "all" if action.dest in ("limit", "eval_images") else "none"
            action.help += f" (default: {shown})"


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


def _compile_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help=f"replay {what} from a graph captured from the Pyro program and checked against "
        "it; default: when the amount of work repays the capture (about 2 s once per process, "
        "0.2 s per graph); --no-compile runs Pyro eagerly throughout",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-vae`` argument parser: every command and flag, with the config
    dataclasses' defaults in ``--help`` (the docs' configuration page prints it)."""
    parser = _Parser(
        prog="pyro-vae",
        description="Train, evaluate and sample variational autoencoders written as Pyro "
        "programs. ELBOs and log-likelihoods are nats per data point, higher is better.",
    )
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = commands.add_parser(
        "train",
        help="train a VAE and write a run folder (metrics, checkpoint, plots, report)",
        description="Train a VAE by SVI. Defaults: the IWAE paper's MLP (2x200 tanh, latent "
        "50), Bernoulli likelihood, dynamic binarization, Adam 1e-3, batch 128; several "
        "latent layers use the bottom-up guide. Requeue-safe: the same command with "
        "--resume auto starts the run, or continues it after an interruption.",
    )
    train.add_argument("--config", type=Path, help="JSON file with sections model/data/train")
    train.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        help="a paper's training protocol, under --config and the flags: iwae = Burda et al. "
        "(2016): MNIST, batch 20, Adam epsilon 1e-4, --lr-schedule iwae over 3280 passes, "
        "log p(x) with K=5000 on the whole test set",
    )
    train.add_argument("--dataset", choices=DATASETS, help="data set")
    train.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="your own data instead: a .npy file (points in rows), a .npz file (arrays train "
        "and test) or a folder of images (subfolders train/ and test/ where present); "
        "without a test set, 10%% of the points are held out",
    )
    train.add_argument("--data-dir", help="folder of IDX files for mnist/fashion-mnist/kmnist")
    train.add_argument("--likelihood", choices=LIKELIHOODS, help="decoder likelihood")
    train.add_argument("--binarize", choices=BINARIZATIONS, help="binarization of images")
    train.add_argument(
        "--estimator",
        metavar="NAME|PATH",
        help=f"one of {', '.join(ESTIMATORS)} (mc is Trace_ELBO; see `pyro-vae estimators`), "
        f"or the import path package.module:Name of your own estimator or of a Pyro ELBO "
        f"class (pyro.infer:RenyiELBO)",
    )
    train.add_argument("--particles", type=int, help="samples of z per data point (K)")
    _estimator_option_flags(train)
    train.add_argument(
        "--model",
        metavar="PATH",
        help="your own model: the import path package.module:factory of a callable that "
        "takes the data shape and returns model and guide (the model flags then do not apply)",
    )
    train.add_argument(
        "--model-option",
        action="append",
        metavar="NAME=VALUE",
        help="a keyword for --model's factory (VALUE read as JSON, else as a string); repeatable",
    )
    train.add_argument(
        "--latent-dims", type=_int_list, help="latent size, e.g. 50; several layers: 100,50"
    )
    train.add_argument("--hidden", type=_int_list, help="hidden widths, e.g. 200,200")
    train.add_argument("--activation", choices=ACTIVATIONS, help="hidden nonlinearity")
    train.add_argument("--network", choices=NETWORKS, help="network kind")
    train.add_argument(
        "--guide",
        choices=GUIDES,
        help="inference order with several latent layers (--latent-dims 100,50): bottom-up "
        "keeps both layers in use without warm-up, top-down loses one without it (the "
        "closed-form KL needs top-down) (default: bottom-up)",
    )
    train.add_argument("--free-bits", type=float, metavar="NATS", help="free bits per layer")
    train.add_argument("--epochs", type=int, help="passes over the training set")
    train.add_argument("--batch-size", type=int, help="data points per step")
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer")
    train.add_argument("--clip-norm", type=float, help="clipped_adam: gradient clip")
    train.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="per epoch; iwae: the IWAE paper's 1e-3 * 10^(-i/7) for 3^i passes, i = 0..7",
    )
    train.add_argument("--adam-epsilon", type=float, help="Adam's epsilon")
    train.add_argument("--lr-gamma", type=float, help="exponential schedule: factor per epoch")
    train.add_argument("--kl-warmup", type=float, metavar="EPOCHS", help="KL warm-up epochs")
    train.add_argument("--validation-size", type=int, help="training points held out")
    train.add_argument("--early-stopping", type=int, metavar="PATIENCE", help="epochs")
    train.add_argument("--limit", type=int, help="use only this many train/test points")
    train.add_argument(
        "--monitor-images",
        type=int,
        metavar="N",
        help="test images evaluated after every epoch, a fixed random subset",
    )
    train.add_argument("--seed", type=int, help="seeds torch, numpy, python, data order")
    train.add_argument("--device", choices=("cpu", "cuda"), help="device")
    _compile_flag(train, "each step's loss and gradients")
    train.add_argument("--out", type=Path, help="run folder (default: a new runs/YYYYmmdd-HHMMSS)")
    train.add_argument(
        "--resume",
        nargs="?",
        const="always",
        choices=("always", "auto"),
        help="continue the run in --out; --resume auto: continue it if it has a checkpoint, "
        "else start it (one job script for first start and requeue). Options equal to the "
        "run's own are accepted; --epochs may grow",
    )
    train.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    train.add_argument(
        "--eval-samples",
        type=int,
        metavar="K",
        help="K of the final importance-sampled log p(x) (IWAE paper: 5000; 0 skips it); "
        "the estimated time is printed before it starts",
    )
    train.add_argument(
        "--eval-images",
        type=int,
        metavar="N",
        help="test images for it, a fixed random subset (the IWAE paper: all of them)",
    )
    train.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log each epoch's scalars and the image grids to RUN/tensorboard "
        "(tensorboard --logdir runs)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel in N processes on this machine (launches torchrun "
        "--standalone --nproc-per-node N; for several machines run torchrun yourself)",
    )
    _with_defaults(train)

    evaluate = commands.add_parser(
        "evaluate",
        help="test ELBO, importance-sampled log p(x), active units, PSIS k-hat",
        description="Evaluate a run folder's model on its test set: the ELBO with both KL "
        "forms and its two terms, log p(x) importance sampled with K samples (the IWAE "
        "paper: 5000), active units and per-unit KL, PSIS k-hat of the weights. Prints the "
        "estimated time first when it is long; writes nothing into the run folder.",
    )
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--samples", type=int, default=5000, help="K")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.add_argument(
        "--images", type=int, metavar="N", help="a fixed random subset of N test images"
    )
    evaluate.add_argument(
        "--ais-steps", type=int, metavar="T", help="also log p(x) by AIS with T annealing steps"
    )
    evaluate.add_argument("--ais-chains", type=int, default=16, metavar="C", help="AIS chains")
    evaluate.add_argument("--ais-leapfrog", type=int, default=5, metavar="L", help="per HMC step")
    evaluate.add_argument(
        "--bdmc", action="store_true", help="with --ais-steps: the BDMC gap on simulated images"
    )
    _compile_flag(evaluate, "the importance weights")

    sample = commands.add_parser(
        "sample",
        help="decode samples from the prior into a PNG grid",
        description="Draw z from the prior of a run folder's model and save the means of "
        "p(x|z) (or draws, --draw) as a PNG grid; small images are scaled up to at least "
        "32 pixels a side (nearest neighbour). Needs no data.",
    )
    sample.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    sample.add_argument("--n", type=int, default=64, help="number of samples")
    sample.add_argument("--out", type=Path, help="PNG file (default RUN_DIR/plots/samples-N.png)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--draw", action="store_true", help="draw x ~ p(x|z) instead of its mean")
    sample.add_argument(
        "--overwrite", action="store_true", help="replace the file --out names if it exists"
    )

    reproduce = commands.add_parser(
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
    reproduce.add_argument("table", choices=("iwae-table1",), help="what to reproduce")
    reproduce.add_argument("--out", type=Path, required=True, help="folder of the cells' runs")
    reproduce.add_argument("--cells", help="comma-separated cells, e.g. 1l-vae-k1 (default: all)")
    reproduce.add_argument("--data-dir", help="folder of the MNIST IDX files (else downloaded)")
    reproduce.add_argument(
        "--epochs", type=int, help="passes per cell, for a partial run (default: the 3280)"
    )
    reproduce.add_argument("--eval-samples", type=int, help="K of log p(x) (default: 5000)")
    reproduce.add_argument("--eval-images", type=int, help="test images (default: all)")
    reproduce.add_argument("--dataset", choices=DATASETS, help="(default: mnist)")
    reproduce.add_argument("--limit", type=int, help="use only this many train/test points")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    reproduce.add_argument(
        "--device", choices=("cpu", "cuda"), help="where each cell trains (default: cpu)"
    )
    _executor_flags(reproduce, gpus=True)
    compare = commands.add_parser(
        "compare",
        help="train one model per estimator on an equal budget and compare them",
        description="Train every estimator from the same initial parameters and data order "
        "on an equal budget (gradient steps, samples of z per data point, or seconds), with K "
        "particles each; evaluate all with the same K for log p(x); measure gradient variance "
        "and SNR, and the SNR's slopes against K and M; give 95% t-intervals over the seeds "
        "and paired differences against a baseline; write comparison.json/.csv/.md and plots.",
    )
    compare.add_argument(
        "--estimators",
        help="comma-separated names or import paths package.module:Name (default: "
        "mc,analytic,iwae,stl,dreg,penalty; without analytic for several latent layers under "
        "the bottom-up guide, where its KL is biased)",
    )
    compare.add_argument("--particles", type=int, default=5, help="K for every estimator")
    _estimator_option_flags(compare)
    compare.add_argument(
        "--model",
        metavar="PATH",
        help="your own model: package.module:factory, a callable taking the data shape "
        "(the model flags then do not apply)",
    )
    compare.add_argument(
        "--model-option", action="append", metavar="NAME=VALUE", help="a keyword for --model"
    )
    compare.add_argument("--dataset", choices=DATASETS, default="digits")
    compare.add_argument("--data-dir", help="folder of IDX files for the MNIST family")
    compare.add_argument("--binarize", choices=BINARIZATIONS, default="dynamic")
    compare.add_argument("--latent-dims", type=_int_list, help="(default: 50)")
    compare.add_argument("--hidden", type=_int_list, help="(default: 200,200)")
    compare.add_argument(
        "--guide",
        choices=GUIDES,
        help="for several latent layers (default: bottom-up, as for train)",
    )
    compare.add_argument("--epochs", type=int, default=10)
    compare.add_argument("--batch-size", type=int, default=128)
    compare.add_argument("--lr", type=float, default=1e-3)
    compare.add_argument("--limit", type=int, help="use only this many train/test points")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--repeats", type=int, default=1, help="seeds per estimator")
    compare.add_argument(
        "--budget",
        choices=("steps", "samples", "seconds"),
        default="steps",
        help="what every estimator gets alike: steps (the same gradient steps, --epochs "
        "epochs), samples (the same samples of z per data point, --epochs x K: one drawing "
        "M x K per step takes 1/M of the steps) or seconds (--seconds of training each, "
        "--epochs then a cap)",
    )
    compare.add_argument(
        "--seconds", type=float, metavar="S", help="with --budget seconds: training seconds per run"
    )
    compare.add_argument(
        "--baseline",
        metavar="NAME",
        help="the estimator the paired differences are taken against (default: the first)",
    )
    compare.add_argument("--eval-samples", type=int, default=1000, help="K for log p(x)")
    compare.add_argument("--eval-points", type=int, help="test points evaluated (default: all)")
    compare.add_argument(
        "--ais-steps", type=int, metavar="T", help="also log p(x) by AIS (16 chains) with T steps"
    )
    compare.add_argument("--grad-draws", type=int, default=100, help="gradient draws")
    compare.add_argument("--snr-particles", type=_int_list, default=(1, 3, 10, 30))
    compare.add_argument(
        "--snr-outer",
        type=_int_list,
        default=(1, 2, 4, 8),
        help="values of M at which the SNR of an estimator with outer samples is measured",
    )
    compare.add_argument("--bound-particles", type=_int_list, default=(1, 5, 50, 500))
    compare.add_argument("--out", type=Path, default=Path("runs/compare"))
    compare.add_argument("--overwrite", action="store_true", help="replace --out's comparison")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the runs train and the gradient and bound studies measure",
    )
    _compile_flag(compare, "training steps and importance weights")
    _executor_flags(compare, gpus=True)
    sweep = commands.add_parser(
        "sweep",
        help="train one run per point of a grid over config keys, e.g. estimator x seed",
        description="Train one run per point of the cartesian product of the grid file's "
        'lists, e.g. {"base": {"data": {"limit": 200}}, "grid": {"train.estimator": '
        '["mc", "analytic"], "train.seed": [0, 1]}}; every run is checked before any is '
        "trained, trains into its own run folder under --out, and sweep.json/.md tabulate them.",
    )
    sweep.add_argument("--grid", type=Path, required=True, help="JSON file: base and grid")
    sweep.add_argument("--out", type=Path, required=True, help="folder for the runs and tables")
    sweep.add_argument(
        "--resume", action="store_true", help="continue the sweep in --out (same --grid)"
    )
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    _executor_flags(sweep, gpus=True)
    diagnose = commands.add_parser(
        "diagnose",
        help="NUTS reference posterior, amortization and approximation gaps, PSIS k-hat",
        description="For test images of a run: sample p(z|x) with NUTS (ArviZ InferenceData "
        "next to the guide's draws), measure the approximation and amortization gaps "
        "(Cremer et al. 2018) and PSIS k-hat; write netCDF, diagnostics.json/.md and plots.",
    )
    diagnose.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    diagnose.add_argument("--images", type=int, default=10, help="first N test images")
    diagnose.add_argument("--image-ids", type=_int_list, help="test image indices, e.g. 3,17")
    diagnose.add_argument("--chains", type=int, default=4, help="NUTS chains")
    diagnose.add_argument("--warmup", type=int, default=300, help="NUTS warm-up steps")
    diagnose.add_argument("--samples", type=int, default=300, help="NUTS draws per chain")
    diagnose.add_argument("--is-samples", type=int, default=5000, help="K for log p(x)")
    diagnose.add_argument("--local-steps", type=int, default=1000, help="local SVI steps")
    diagnose.add_argument("--khat-images", type=int, default=1000, help="images for k-hat")
    diagnose.add_argument("--khat-samples", type=int, default=1000, help="K for k-hat")
    diagnose.add_argument("--seed", type=int, default=0)
    diagnose.add_argument("--no-jit", action="store_true", help="NUTS without the JIT")
    diagnose.add_argument("--out", type=Path, help="default RUN_DIR/diagnostics")
    diagnose.add_argument("--overwrite", action="store_true", help="replace earlier diagnostics")
    diagnose.add_argument("--quiet", action="store_true", help="no progress bars")
    diagnose.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model runs: NUTS, local SVI, importance weights",
    )
    _compile_flag(diagnose, "the importance weights")
    estimators = commands.add_parser(
        "estimators",
        help="list the estimators: what each is, its options, what it claims",
        description="Each registered estimator (or the one an import path names) with its "
        "summary, paper, options (type and default) and claims: a lower bound, a value, "
        "the closed-form KL, how its loss is captured.",
    )
    estimators.add_argument(
        "estimator", nargs="?", metavar="NAME|PATH", help="one estimator (default: all)"
    )
    return parser


def _estimators(args: argparse.Namespace) -> int:
    """``pyro-vae estimators``: the registry, or one estimator, as text."""
    from pyro_vae.objectives.registry import describe_estimator, estimator_spec

    specs = [estimator_spec(args.estimator)] if args.estimator else list(ESTIMATORS.values())
    print("\n\n".join(describe_estimator(spec) for spec in specs))
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from pyro_vae.app.diagnose import diagnose
    from pyro_vae.app.diagnose_report import console_lines

    result = diagnose(
        args.run_dir,
        args.out,
        images=args.images,
        image_ids=args.image_ids,
        chains=args.chains,
        warmup=args.warmup,
        samples=args.samples,
        is_samples=args.is_samples,
        local_steps=args.local_steps,
        khat_images=args.khat_images,
        khat_samples=args.khat_samples,
        seed=args.seed,
        jit=not args.no_jit,
        overwrite=args.overwrite,
        progress=not args.quiet,
        compile=args.compile,
        device=args.device,
    )
    for line in console_lines(result):
        print(line)
    out = args.out or args.run_dir / "diagnostics"
    print(f"diagnostics: {out / 'diagnostics.md'}")
    return 0


def _executor_flags(parser: argparse.ArgumentParser, gpus: bool = False) -> None:
    parser.add_argument(
        "--executor",
        choices=("serial", "ray"),
        default="serial",
        help="where the runs train: serial (this process, one after another; default) or ray "
        "(one Ray task per run, in parallel; pip install 'pyro-vae[ray]')",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="with --executor ray: auto or host:port of a running cluster (default: start a "
        "local Ray on this machine's CPUs)",
    )
    parser.add_argument(
        "--cpus-per-run",
        type=int,
        metavar="N",
        help="CPUs each Ray task asks for; on either executor, the torch threads of each "
        "run (default 1), so that serial and Ray runs give the same numbers bit for bit",
    )
    if gpus:
        parser.add_argument(
            "--gpus-per-run",
            type=float,
            metavar="G",
            help="GPUs each Ray task asks for (default 1 for runs on cuda, else 0)",
        )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="Ray: times a run whose worker died is retried, resuming from its checkpoint",
    )


def _executor(args: argparse.Namespace, gpus_per_run: float = 0.0):
    """The executor the flags ask for, checked (Ray installed) before anything is written."""
    from pyro_vae.app.executors import import_ray, make_executor

    if args.ray_address is not None and args.executor != "ray":
        raise UserInputError("--ray-address needs --executor ray")
    if args.cpus_per_run is not None and args.cpus_per_run < 1:
        raise UserInputError(f"--cpus-per-run must be >= 1, got {args.cpus_per_run}")
    if args.max_retries < 0:
        raise UserInputError(f"--max-retries must be >= 0, got {args.max_retries}")
    gpus = getattr(args, "gpus_per_run", None)
    if gpus is None:
        gpus = gpus_per_run
    elif not 0 <= gpus < float("inf"):
        raise UserInputError(f"--gpus-per-run must be >= 0, got {gpus}")
    if args.executor == "ray":
        import_ray()
    return make_executor(args.executor, args.ray_address, args.cpus_per_run, gpus, args.max_retries)


def _sweep(args: argparse.Namespace, argv: list[str] | None) -> int:
    from pyro_vae.app.runs import RunLock, command_line, is_empty
    from pyro_vae.app.sweep import check_runs, expand_grid, load_grid, run_sweep
    from pyro_vae.io import atomic_write_json, read_json

    if args.out.exists() and not args.out.is_dir():
        raise UserInputError(f"--out {args.out} is a file: pass a folder")
    grid = load_grid(args.grid)
    runs = expand_grid(grid, source=f"grid file {args.grid}")
    cuda = any(run.config.train.device == "cuda" for run in runs)
    executor = _executor(args, gpus_per_run=1.0 if cuda else 0.0)
    check_runs(runs, check_device=args.executor == "serial")
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
            )
    for run in result["runs"]:
        extra = (
            f", log p(x) {run['test_log_likelihood']:.3f}" if "test_log_likelihood" in run else ""
        )
        seconds = run["train_seconds"]
        print(f"{run['name']}: test ELBO {run['test_elbo']:.3f}{extra}, {seconds:.1f} s training")
    print(f"sweep: {args.out / 'sweep.md'}")
    return 0


#: compare's estimators when --estimators is not given
COMPARE_ESTIMATORS = ("mc", "analytic", "iwae", "stl", "dreg", "penalty")


def _default_estimators(args: argparse.Namespace) -> list[str]:
    """Every estimator, but analytic only where its closed-form KL is exact: one latent
    layer, or several under the top-down guide (the bottom-up default biases it)."""
    layers = len(args.latent_dims or ModelConfig().latent_dims)
    if layers > 1 and args.guide != "top-down":
        print(
            "note: analytic is left out of the default estimators: under the bottom-up guide "
            "of several latent layers its closed-form KL is biased (--guide top-down makes "
            "it exact)",
            file=sys.stderr,
        )
        return [name for name in COMPARE_ESTIMATORS if name != "analytic"]
    return list(COMPARE_ESTIMATORS)


def comparison_options(estimators: list[str], pairs: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs as the options of a comparison: each parsed by the first
    estimator compared that takes it (each estimator then gets those it takes)."""
    from pyro_vae.objectives.registry import estimator_spec

    values: dict[str, Any] = {}
    specs = [estimator_spec(name) for name in estimators]
    for pair in pairs:
        name = pair.partition("=")[0].strip()
        owner = next((s for s in specs if any(o.name == name for o in s.options)), None)
        if owner is None:
            raise UserInputError(
                f"no estimator compared takes the option {name!r}: `pyro-vae estimators` "
                f"lists each estimator's options"
            )
        values.update(owner.parse_options([pair]))
    return values


def _compare(args: argparse.Namespace, argv: list[str] | None) -> int:

    from pyro_vae.app.compare import markdown_table, parse_estimators
    from pyro_vae.app.compare_report import interval_note
    from pyro_vae.app.runs import RunLock, command_line, is_empty
    from pyro_vae.objectives.registry import estimator_spec

    estimators = parse_estimators(args.estimators or _default_estimators(args))
    executor = _executor(args, gpus_per_run=1.0 if args.device == "cuda" else 0.0)
    check_device(args.device)
    if args.particles < 1:
        raise UserInputError(f"--particles must be >= 1, got {args.particles}")
    if args.repeats < 1:
        raise UserInputError(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 <= args.seed <= 2**32 - args.repeats:
        raise UserInputError(
            f"--seed with --repeats {args.repeats} uses seeds {args.seed} to "
            f"{args.seed + args.repeats - 1}; each must be in [0, 4294967295]"
        )
    if args.out.exists() and not args.out.is_dir():
        raise UserInputError(f"--out {args.out} is a file: pass a folder")
    if args.eval_points is not None and args.eval_points < 1:
        raise UserInputError(f"--eval-points must be >= 1, got {args.eval_points}")
    if args.budget == "seconds" and args.seconds is None:
        raise UserInputError("--budget seconds needs --seconds S, the training seconds per run")
    if args.seconds is not None and args.budget != "seconds":
        raise UserInputError(f"--seconds applies to --budget seconds, not --budget {args.budget}")
    if args.seconds is not None and not (math.isfinite(args.seconds) and args.seconds > 0):
        raise UserInputError(f"--seconds must be > 0, got {args.seconds}")
    if args.baseline is not None:
        baseline = estimator_spec(args.baseline).key
        if baseline not in estimators:
            raise UserInputError(
                f"--baseline {args.baseline} is not among the estimators compared "
                f"({', '.join(estimators)})"
            )
    if min(args.snr_outer) < 1:
        raise UserInputError("every M in --snr-outer must be >= 1")
    model: dict[str, Any] = {} if args.guide is None else {"guide": args.guide}
    if args.latent_dims:
        model["latent_dims"] = args.latent_dims
    if args.hidden:
        model["hidden"] = args.hidden
    if args.model:
        model["factory"] = args.model
        model["factory_options"] = model_options(args.model_option)
    config = RunConfig(
        model=ModelConfig(**model),
        data=DataConfig(
            dataset=args.dataset, data_dir=args.data_dir, binarize=args.binarize, limit=args.limit
        ),
        train=TrainConfig(
            particles=args.particles,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            compile="auto" if args.compile is None else args.compile,
        ),
    )
    # (the options of several estimators: no one TrainConfig takes them all)
    options = comparison_options(estimators, estimator_options(args))
    with RunLock(args.out, command_line(argv)):
        if not is_empty(args.out):
            # runs/ without comparison.json: a comparison that was interrupted
            if not (args.out / "comparison.json").exists() and not (args.out / "runs").is_dir():
                raise UserInputError(
                    f"{args.out} is not empty and holds no comparison: choose a new or empty folder"
                )
            if not args.overwrite:
                raise UserInputError(
                    f"{args.out} holds a comparison: pass --overwrite to replace it, or another "
                    f"--out"
                )
        with executor:
            result = _run_compare(args, argv, config, estimators, executor, options)
    print(
        markdown_table(
            result["summary"],
            result["eval_samples"],
            result.get("ais_steps"),
            budget=result["budget"]["kind"],
        )
    )
    print(interval_note(result["repeats"], result["ci_level"]))
    print(f"comparison: {args.out / 'comparison.md'}")
    return 0


def _run_compare(args, argv, config, estimators, executor=None, options=None):
    from pyro_vae.app.compare import compare_estimators
    from pyro_vae.app.runs import command_line

    return compare_estimators(
        config,
        estimators,
        args.out,
        repeats=args.repeats,
        eval_samples=args.eval_samples,
        eval_points=args.eval_points,
        grad_draws=args.grad_draws,
        snr_particles=args.snr_particles,
        bound_particles=args.bound_particles,
        progress=not args.quiet,
        command=command_line(argv),
        executor=executor,
        ais_steps=args.ais_steps,
        budget=args.budget,
        budget_seconds=args.seconds,
        baseline=args.baseline,
        snr_outer=args.snr_outer,
        estimator_options=options,
    )


def resolve_config(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """``base`` (the defaults), then ``--config``, then flags; validated as it is built."""
    config = base or RunConfig()
    if getattr(args, "protocol", None):
        config = with_protocol(config, args.protocol)
    if args.config:
        config = _overlay(config, args.config)
    sections: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}}
    for flag, (section, name) in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            sections[section][name] = value
    pairs = estimator_options(args)
    if pairs:
        from pyro_vae.objectives.registry import estimator_spec

        chosen = sections["train"].get("estimator", config.train.estimator)
        given = estimator_spec(chosen).parse_options(pairs)
        kept = config.train.estimator_options if chosen == config.train.estimator else {}
        sections["train"]["estimator_options"] = {**kept, **given}
    elif sections["train"].get("estimator", config.train.estimator) != config.train.estimator:
        sections["train"]["estimator_options"] = {}  # (the options of the one replaced)
    if getattr(args, "model", None) is not None:
        sections["model"]["factory"] = args.model
    if getattr(args, "model_option", None):
        sections["model"]["factory_options"] = model_options(args.model_option)
    own = getattr(args, "data", None)
    if own is not None:
        if args.dataset is not None:
            raise UserInputError("--data and --dataset both name the data: pass one of them")
        if not own.exists():
            raise UserInputError(f"--data {own} does not exist: pass a .npy/.npz file or folder")
        sections["data"]["dataset"] = str(own.expanduser().resolve())
    # run folders hold absolute paths: they are read from any directory
    if sections["data"].get("data_dir") is not None:
        sections["data"]["data_dir"] = str(
            Path(sections["data"]["data_dir"]).expanduser().resolve()
        )
    return RunConfig(
        model=dataclasses.replace(config.model, **sections["model"]),
        data=dataclasses.replace(config.data, **sections["data"]),
        train=dataclasses.replace(config.train, **sections["train"]),
    )


def _overlay(config: RunConfig, path: Path) -> RunConfig:
    """The settings of config file ``path`` over ``config`` (validated as a whole first,
    so that its errors name the file)."""
    from pyro_vae.io import read_json

    RunConfig.load(path)  # unknown sections or keys, bad values: one line naming the file
    values = read_json(path, "config file")
    return RunConfig(
        model=dataclasses.replace(config.model, **values.get("model", {})),
        data=dataclasses.replace(config.data, **values.get("data", {})),
        train=dataclasses.replace(config.train, **legacy_train_section(values.get("train", {}))),
    )


def _train(
    args: argparse.Namespace, argv: list[str] | None, followers: _Followers | None = None
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
        return _launch_torchrun(args.nproc, argv)
    if distributed.launched_by_torchrun() and not distributed.available():
        distributed.init_from_environment(args.device or "cpu")
        try:
            if distributed.restart_count() > 0 and not args.resume:
                args.resume = "auto"  # an elastic restart continues from the last checkpoint
            if not distributed.is_main():
                return _follow(args)
            followers, status = _Followers(), 2
            try:
                status = _train(args, argv, followers)
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


def _train_locked(
    args: argparse.Namespace,
    argv: list[str] | None,
    out: Path,
    prepared: PreparedRun | None,
    start_over: bool = False,
    followers: _Followers | None = None,
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
    transaction = _Transaction(out, replacing)
    try:
        return run_training(prepared, out, args, argv, transaction, followers)
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
    names = {value: flag for flag, value in _TRAIN_FLAGS.items()}

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


class _Transaction:
    """What ``train`` wrote, taken back if it fails before its first epoch is saved."""

    def __init__(self, out: Path, replacing: bool) -> None:
        self.out = out
        self.replacing = replacing
        config = out / "config.json"
        self.config_before = config.read_bytes() if config.exists() else None
        self.existing = {p.name for p in out.iterdir()} if out.exists() else set()
        self.committed = False

    def commit(self, *_: Any) -> None:
        """The first epoch of this command is checkpointed: the run stands."""
        if not self.committed:
            from pyro_vae.app.runs import drop_replaced

            self.committed = True
            drop_replaced(self.out)

    def rollback(self) -> None:
        from pyro_vae.app.runs import RUN_FILES, restore_replaced

        if self.committed:
            return
        if self.replacing:
            restore_replaced(self.out)
            return
        for name in RUN_FILES:
            path = self.out / name
            if name not in self.existing and path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if self.config_before is not None:
            from pyro_vae.io import atomic_write_bytes

            atomic_write_bytes(self.config_before, self.out / "config.json")


class _Followers:
    """Under torchrun: the first process validates, locks and prepares the run folder
    alone, then sends the other processes the run's config to train with (or a stop,
    with the exit status, when it will not train: bad input, nothing to do)."""

    def __init__(self) -> None:
        self.sent = False

    def _send(self, payload: dict[str, Any]) -> None:
        from pyro_vae import distributed

        if not self.sent and distributed.world_size() > 1 and distributed.is_main():
            self.sent = True
            distributed.broadcast_object(payload)

    def go(self, payload: dict[str, Any]) -> None:
        self._send(payload)

    def stop(self, status: int) -> None:
        self._send({"stop": status})


def _follow(args: argparse.Namespace) -> int:
    """A process other than the first under torchrun: train what the first sends."""
    from pyro_vae import distributed
    from pyro_vae.analysis.evaluation import evaluate

    payload = distributed.broadcast_object(None)
    if "stop" in payload:
        return int(payload["stop"])  # the first process said why
    config = RunConfig.from_dict(payload["config"])
    prepared = prepare_run(config, quiet=True)
    try:
        _follow_fit(prepared, payload)
    except NonFiniteError:
        return 1  # all processes stop together; the first says why
    except Preempted as stop:
        return stop.status  # (the first process says where the run stopped)
    if config.train.eval_samples:  # its share of the final evaluation
        images = final_evaluation_images(config, prepared.data).to(config.train.device)
        evaluate(prepared.vae, images, config.train.eval_samples)
    return 0


def _follow_fit(prepared: PreparedRun, payload: dict[str, Any]) -> None:
    from pyro_vae.training.fit import fit

    config = prepared.config
    fit(
        prepared.vae,
        prepared.data,
        config.train,
        run_dir=Path(payload["out"]),
        resume=payload["resume"],
        saved_config=config.to_dict(),
        progress=False,
        log=None,
    )


def _launch_torchrun(nproc: int, argv: list[str] | None) -> int:
    """``--nproc N``: run this command again under ``torchrun --standalone``."""
    if nproc < 1:
        raise UserInputError(f"--nproc must be >= 1, got {nproc}")
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    import logging
    import os

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun's agent, in this process: its failure summary (40 lines, with a traceback)
    # is replaced by one line; the processes print their own errors (the first alone)
    for name in [*logging.root.manager.loggerDict, "torch.distributed"]:
        if name.startswith("torch.distributed"):  # (each sets a level of its own)
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHED_BY_NPROC] = "1"
    options = torchrun.get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "pyro_vae", *kept]
    )
    try:
        torchrun.run(options)
    except ChildFailedError as failed:
        return _failed_processes(failed, nproc)
    except SignalException as stop:  # (the agent passed the signal on to the processes)
        return 128 + int(stop.sigval)
    finally:
        os.environ.pop(LAUNCHED_BY_NPROC, None)
    return 0


#: set for the processes that ``train --nproc`` starts: a lost process is named by the
#: launcher, which knows which one it was, rather than by the processes that lost it
LAUNCHED_BY_NPROC = "PYRO_VAE_NPROC"


def _failed_processes(failed: Any, nproc: int) -> int:
    """The exit status of a failed ``--nproc`` run, and one line if a process was lost
    (killed by a signal) rather than stopped by an error it printed itself."""
    import signal as signals

    rank, failure = failed.get_first_failure()
    if failure.exitcode < 0:  # the first to fail was killed: it could not say why
        try:
            name = signals.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        print(
            f"pyro-vae train: stopped: training process {rank} (of {nproc}) was "
            f"lost (killed by {name}); the last checkpoint is intact: run the same command "
            f"with --resume auto",
            file=sys.stderr,
        )
        return 1
    return failure.exitcode if failure.exitcode > 0 else 1


@dataclasses.dataclass
class PreparedRun:
    """A run checked and ready before its folder is touched: config, data, model, the
    estimated seconds of the final evaluation, and the epochs already trained."""

    config: RunConfig
    data: Any
    vae: Any
    evaluation_seconds: float = 0.0  # estimated, for the final log p(x)
    start_epoch: int = 0  # epochs already trained (a resumed run)


def prepare_run(config: RunConfig, quiet: bool = False) -> PreparedRun:
    """Everything a run needs, checked, before its folder is touched: the device, the
    data (read and checked against the model), the model, the estimator, the memory,
    and the time the final log p(x) will take (an absurd K is refused now, not after
    training)."""
    from pyro_vae.app.training_run import checked_model

    check_device(config.train.device)
    data = config.data.load(config.train.seed)
    # on its device from the start: the checks and the time estimate run where it trains
    vae = checked_model(config, data)
    seconds = 0.0
    if config.train.eval_samples and not quiet:  # (the other torchrun processes: no estimate)
        from pyro_vae.analysis.evaluation import announce_evaluation

        images = final_evaluation_images(config, data)
        seconds = announce_evaluation(vae, images, config.train.eval_samples, log=None)
    if config.model.likelihood == "bernoulli" and config.data.binarize == "none" and not quiet:
        print(
            "note: grey levels under a Bernoulli likelihood are scored by cross-entropy, not "
            "a normalized density: log p(x) is not comparable to published numbers (use "
            "--binarize dynamic, or --likelihood continuous_bernoulli)",
            file=sys.stderr,
        )
    return PreparedRun(config, data, vae, seconds)


def run_training(
    prepared: PreparedRun,
    out: Path,
    args: argparse.Namespace,
    argv: list[str] | None,
    transaction: _Transaction,
    followers: _Followers | None = None,
) -> int:
    """Train a prepared run into ``out`` (under its lock), evaluate it, write plots and the
    report; ``transaction`` takes back what was written if the first epoch fails;
    ``followers`` (under torchrun) are sent the run to train with this process."""
    from pyro_vae.analysis.evaluation import evaluate
    from pyro_vae.app.runs import write_plots, write_report
    from pyro_vae.io import atomic_write_json
    from pyro_vae.resources import human_seconds
    from pyro_vae.training.fit import fit

    config, data, vae = prepared.config, prepared.data, prepared.vae
    callbacks: list[Any] = [transaction.commit]
    tracker = None
    if args.tensorboard:
        from pyro_vae.app.tracking import TensorBoardLogger

        start = prepared.start_epoch
        tracker = TensorBoardLogger(out / "tensorboard", start_epoch=start)
        callbacks.append(tracker)
    config.save(out / "config.json")
    progress = not args.quiet
    if followers is not None:
        followers.go({"config": config.to_dict(), "resume": bool(args.resume), "out": str(out)})
    history = fit(
        vae,
        data,
        config.train,
        run_dir=out,
        resume=bool(args.resume),
        saved_config=config.to_dict(),
        progress=progress,
        callbacks=callbacks,
    )
    transaction.commit()  # (a resumed run with no epoch left to train)
    if tracker is not None:
        tracker.log_images(vae, data.evaluation_images("test"), len(history.epochs))
        tracker.close()
    evaluation = None
    samples = config.train.eval_samples
    if samples:
        images = final_evaluation_images(config, data).to(config.train.device)
        print(
            f"evaluating: importance-sampled log p(x) with K={samples} on {len(images):,} "
            f"test images, about {human_seconds(prepared.evaluation_seconds)} ..."
        )
        evaluation = evaluate(vae, images, samples, progress=progress)
    flags = run_flags(config, history.epochs, evaluation)
    if evaluation is not None:
        evaluation["flags"] = [flag.to_dict() for flag in flags]
        atomic_write_json(evaluation, out / "evaluation.json")
        print(format_evaluation(evaluation))
    for flag in flags:
        print(f"warning: {flag.message()}", file=sys.stderr)
    plot_paths = write_plots(out, vae, data, history.epochs)
    report = write_report(
        out,
        config,
        history.epochs,
        evaluation,
        reproduce_command(config, out),
        plot_paths,
        history.stopped_early,
        history.best_epoch,
        flags=flags,
    )
    print(f"run folder: {out}  (report: {report})")
    return 0


def run_flags(
    config: RunConfig, epochs: list[dict[str, Any]], evaluation: dict[str, Any] | None
) -> list[Any]:
    """The numbers of a run that cannot be right (:mod:`pyro_vae.analysis.sanity`):
    bounds above 0 under a Bernoulli likelihood, jumps between epochs, an ELBO above
    log p(x)."""
    from pyro_vae.analysis.sanity import evaluation_flags, history_flags
    from pyro_vae.objectives.registry import ESTIMATORS

    binary = config.model.likelihood == "bernoulli"
    spec = ESTIMATORS.get(config.train.estimator)
    flags = history_flags(epochs, binary=binary, is_bound=spec is None or spec.is_bound)
    if evaluation is not None:
        flags += evaluation_flags(evaluation, binary=binary)
    return flags


def final_evaluation_images(config: RunConfig, data) -> Any:
    """The test images of the final evaluation: all, or ``config.train.eval_images`` of
    them, a fixed random subset (seeded by the run's seed, the same on every resume)."""
    from pyro_vae.analysis.evaluation import fixed_subset

    return fixed_subset(data.evaluation_images("test"), config.train.eval_images)


def reproduce_command(config: RunConfig, out: Path) -> str:
    """The command that recreates the run from scratch in a fresh folder: every setting
    that differs from the defaults, as its flag (settings without a flag: as a config)."""
    import shlex

    defaults = RunConfig()
    flags = {value: flag for flag, value in _TRAIN_FLAGS.items()}
    argv = ["train", "--dataset", config.data.dataset]  # (named even when the default)
    for section in ("data", "model", "train"):
        for name, value in config.section(section).items():
            if value == defaults.section(section)[name] or name == "dataset":
                continue
            flag = flags.get((section, name))
            if flag is None or value is None:
                # a setting no flag can express (a learned Gaussian scale, all monitor
                # images): the run's own config.json recreates it
                return "pyro-vae " + shlex.join(
                    ["train", "--config", str(out / "config.json"), "--out", "NEW_FOLDER"]
                )
            option = f"--{flag.replace('_', '-')}"
            if isinstance(value, bool):
                argv.append(option if value else f"--no-{flag.replace('_', '-')}")
            elif isinstance(value, (tuple, list)):
                argv += [option, ",".join(map(str, value))]
            else:
                argv += [option, str(value)]
    argv += ["--out", str(out)]
    return "pyro-vae " + shlex.join(argv)


def _nats(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} nats"


def format_evaluation(result: dict[str, Any]) -> str:
    """The console lines of an evaluation (:func:`~pyro_vae.analysis.evaluation.evaluate`
    result): test ELBO and its terms, log p(x) with its K, active units, PSIS k-hat."""
    return "\n".join(
        [
            f"test ELBO            {result['test_elbo']:10.3f}  = E[log p(x|z)] "
            f"{result['test_expected_log_likelihood']:.3f} - KL {result['test_kl']:.3f}",
            f"test ELBO (MC KL)    {result['test_elbo_mc']:10.3f}",
            f"test log p(x), K={result['importance_samples']:<4} "
            f"{result['test_log_likelihood']:10.3f}  (NLL {result['test_nll']:.3f}, "
            f"s.e.m. {result['test_log_likelihood_sem']:.3f})",
            f"active units         {result['active_units']:>10} of {result['latent_dims']}  "
            f"(Cov_x E_q[z] > 0.01; per-unit KL median {_nats(result.get('kl_per_unit_median'))}"
            f", {result.get('informative_units', '-')} units above 0.1 nats)",
            (
                f"PSIS k-hat           mean {result['khat_mean']:.2f}, max "
                f"{result['khat_max']:.2f}, {result['khat_share_above_0.7']:.1%} above 0.7"
                if result["khat_mean"] is not None
                else f"PSIS k-hat           {result['khat_note']}"
            ),
        ]
    )


def _evaluate(args: argparse.Namespace) -> int:
    from pyro_vae.analysis.ais import announce_ais
    from pyro_vae.analysis.evaluation import announce_evaluation, evaluate, fixed_subset
    from pyro_vae.app.ais_report import format_ais, measure_ais
    from pyro_vae.app.runs import load_run

    if args.samples < 1:
        raise UserInputError(f"--samples must be >= 1, got {args.samples}")
    _check_ais_flags(args)
    check_device(args.device)
    run = load_run(args.run_dir, args.device)
    vae, data = run.model, run.data
    images = fixed_subset(data.evaluation_images("test"), args.images).to(args.device)
    log = None if args.json else print
    announce_evaluation(vae, images, args.samples, log=log)
    if args.ais_steps is not None:
        announce_ais(
            vae, images, args.ais_steps, args.ais_chains, args.ais_leapfrog, bdmc=args.bdmc, log=log
        )
    result = evaluate(
        vae,
        images,
        args.samples,
        progress=not args.quiet and not args.json,
        compile=args.compile,
    )
    if args.ais_steps is not None:
        result.update(
            measure_ais(
                vae, images, args.ais_steps, args.ais_chains, args.ais_leapfrog, args.bdmc,
                progress=not args.quiet and not args.json,
            )
        )  # fmt: skip
    result["run_dir"] = str(args.run_dir)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_evaluation(result))
        if args.ais_steps is not None:
            print(format_ais(result))
    return 0


def _check_ais_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--images", args.images), ("--ais-steps", args.ais_steps)):
        if value is not None and value < 1:
            raise UserInputError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--ais-chains", args.ais_chains), ("--ais-leapfrog", args.ais_leapfrog)):
        if value < 1:
            raise UserInputError(f"{flag} must be >= 1, got {value}")
    if args.bdmc and args.ais_steps is None:
        raise UserInputError("--bdmc brackets AIS: give the number of steps with --ais-steps T")


def _train_cell(argv: list[str]) -> int:
    """``pyro-vae train ARGV`` for one cell of ``reproduce``: a top-level function, so that
    a Ray task can run it; bad input raises (one line, through the executor)."""
    return _train(build_parser().parse_args(argv), argv)


def _reproduce(args: argparse.Namespace) -> int:
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
    parser = build_parser()
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
    executor = _executor(args, gpus_per_run=1.0 if args.device == "cuda" else 0.0)
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


def _sample(args: argparse.Namespace) -> int:
    import contextlib

    from pyro_vae.app.runs import check_no_links, load_run
    from pyro_vae.io import atomic_write_bytes, confined, make_folder

    if args.n < 1:
        raise UserInputError(f"--n must be >= 1, got {args.n}")
    out = args.out or args.run_dir / "plots" / f"samples-{args.n}.png"
    if out.exists() and out.is_dir():
        raise UserInputError(f"--out {out} is a folder: pass a PNG file name")
    if out.suffix.lower() != ".png":
        raise UserInputError(f"--out {out} must end in .png")
    if args.out is not None and (out.exists() or out.is_symlink()) and not args.overwrite:
        raise UserInputError(
            f"--out {out} exists: pass --overwrite to replace it, or another file name"
        )
    # the default file is the run's own (RUN/plots): no link there is followed
    inside = args.out is None
    if inside:
        check_no_links(args.run_dir)
    run = load_run(args.run_dir, with_data=False)  # sampling needs no data
    config, vae = run.config, run.model
    import torch
    from torchvision.utils import save_image

    from pyro_vae.data import data_shape_of
    from pyro_vae.models.protocol import image_shape, prior_samples
    from pyro_vae.resources import check_sampling_fits

    shape = tuple(getattr(vae, "data_shape", None) or data_shape_of(config.data.dataset))
    check_sampling_fits(config.model, shape, args.n)
    torch.manual_seed(args.seed)
    example = torch.zeros(1, math.prod(shape))  # (the data reach a model flattened)
    samples = prior_samples(vae, args.n, example, mean=not args.draw)
    samples = samples.reshape(args.n, *image_shape(vae, example))
    scale = -(-32 // min(samples.shape[-2:]))  # small images (8x8 digits) scaled up
    if scale > 1:
        samples = torch.nn.functional.interpolate(samples, scale_factor=scale, mode="nearest")
    import io

    buffer = io.BytesIO()
    grid = samples.clamp(0, 1)
    save_image(grid, buffer, format="png", nrow=max(1, int(args.n**0.5)), padding=1, pad_value=1.0)
    with confined(args.run_dir) if inside else contextlib.nullcontext():
        make_folder(out.parent)
        # a file that appeared meanwhile is still not replaced without --overwrite
        atomic_write_bytes(buffer.getvalue(), out, replace=args.overwrite or inside)
    print(out)
    return 0


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
        if args.command == "train":
            return _train(args, argv)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "sample":
            return _sample(args)
        if args.command == "compare":
            return _compare(args, argv)
        if args.command == "sweep":
            return _sweep(args, argv)
        if args.command == "diagnose":
            return _diagnose(args)
        if args.command == "estimators":
            return _estimators(args)
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
    return 0


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
_SETTING_FLAGS = {field: flag for flag, (_, field) in _TRAIN_FLAGS.items()} | {
    "out": "out",
    "overwrite": "overwrite",
    "n": "n",
}


def as_flags(message: str) -> str:
    """A library message in the command line's words: the library names a setting in
    backticks, `lr` or `estimator='mc'`; the command line prints --lr, --estimator mc."""

    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if name not in _SETTING_FLAGS:
            return match.group(0)
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
