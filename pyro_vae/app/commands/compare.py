"""``pyro-vae compare``: the flags of a comparison checked and made into its config."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from pyro_vae.app.flags import (
    compile_flag,
    estimator_option_flags,
    estimator_options,
    executor_flags,
    executor_from_flags,
    int_list,
    model_options,
)
from pyro_vae.choices import (
    BINARIZATIONS,
    DATASETS,
    GUIDES,
)
from pyro_vae.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from pyro_vae.errors import UserInputError
from pyro_vae.resources import check_device


def add_parser(commands: Any) -> None:
    """``pyro-vae compare`` and its flags, on the subparsers ``commands``."""
    parser = commands.add_parser(
        "compare",
        help="train one model per estimator on an equal budget and compare them",
        description="Train every estimator from the same initial parameters and data order "
        "on an equal budget (gradient steps, samples of z per data point, or seconds), with K "
        "particles each; evaluate all with the same K for log p(x); measure gradient variance "
        "and SNR, and the SNR's slopes against K and M; give 95% t-intervals over the seeds "
        "and paired differences against a baseline; write comparison.json/.csv/.md and plots.",
    )
    _run_flags(parser)
    _budget_flags(parser)
    _measurement_flags(parser)


def _run_flags(parser: argparse.ArgumentParser) -> None:
    """The estimators, the model, the data and the training of each run."""
    parser.add_argument(
        "--estimators",
        help="comma-separated names or import paths package.module:Name (default: "
        "mc,analytic,iwae,stl,dreg,penalty; without analytic for several latent layers under "
        "the bottom-up guide, where its KL is biased)",
    )
    parser.add_argument("--particles", type=int, default=5, help="K for every estimator")
    estimator_option_flags(parser)
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="your own model: package.module:factory, a callable taking the data shape "
        "(the model flags then do not apply)",
    )
    parser.add_argument(
        "--model-option", action="append", metavar="NAME=VALUE", help="a keyword for --model"
    )
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--data-dir", help="folder of IDX files for the MNIST family")
    parser.add_argument("--binarize", choices=BINARIZATIONS, default="dynamic")
    parser.add_argument("--latent-dims", type=int_list, help="(default: 50)")
    parser.add_argument("--hidden", type=int_list, help="(default: 200,200)")
    parser.add_argument(
        "--guide",
        choices=GUIDES,
        help="for several latent layers (default: bottom-up, as for train)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, help="use only this many train/test points")
    parser.add_argument("--seed", type=int, default=0)


def _budget_flags(parser: argparse.ArgumentParser) -> None:
    """The repeats, the budget every estimator gets alike, the baseline."""
    parser.add_argument("--repeats", type=int, default=1, help="seeds per estimator")
    parser.add_argument(
        "--budget",
        choices=("steps", "samples", "seconds"),
        default="steps",
        help="what every estimator gets alike: steps (the same gradient steps, --epochs "
        "epochs), samples (the same samples of z per data point, --epochs x K: one drawing "
        "M x K per step takes 1/M of the steps) or seconds (--seconds of training each, "
        "--epochs then a cap)",
    )
    parser.add_argument(
        "--seconds", type=float, metavar="S", help="with --budget seconds: training seconds per run"
    )
    parser.add_argument(
        "--baseline",
        metavar="NAME",
        help="the estimator the paired differences are taken against (default: the first)",
    )


def _measurement_flags(parser: argparse.ArgumentParser) -> None:
    """What is measured, the output folder, the device and the executor."""
    parser.add_argument("--eval-samples", type=int, default=1000, help="K for log p(x)")
    parser.add_argument("--eval-points", type=int, help="test points evaluated (default: all)")
    parser.add_argument(
        "--ais-steps", type=int, metavar="T", help="also log p(x) by AIS (16 chains) with T steps"
    )
    parser.add_argument("--grad-draws", type=int, default=100, help="gradient draws")
    parser.add_argument("--snr-particles", type=int_list, default=(1, 3, 10, 30))
    parser.add_argument(
        "--snr-outer",
        type=int_list,
        default=(1, 2, 4, 8),
        help="values of M at which the SNR of an estimator with outer samples is measured",
    )
    parser.add_argument("--bound-particles", type=int_list, default=(1, 5, 50, 500))
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--overwrite", action="store_true", help="replace --out's comparison")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the runs train and the gradient and bound studies measure",
    )
    compile_flag(parser, "training steps and importance weights")
    executor_flags(parser, gpus=True)


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


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``pyro-vae compare``: the flags checked, then the comparison trained into --out,
    locked; its table printed."""
    from pyro_vae.app.compare import markdown_table
    from pyro_vae.app.compare_checks import parse_estimators
    from pyro_vae.app.compare_report import interval_note
    from pyro_vae.app.lock import RunLock
    from pyro_vae.app.runs import command_line, is_empty

    estimators = parse_estimators(args.estimators or _default_estimators(args))
    executor = executor_from_flags(args, gpus_per_run=1.0 if args.device == "cuda" else 0.0)
    check_device(args.device)
    _check_flags(args, estimators)
    config = _config(args)
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


def _run_compare(
    args: argparse.Namespace,
    argv: list[str] | None,
    config: RunConfig,
    estimators: list[str],
    executor: Any = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
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


def _check_flags(args: argparse.Namespace, estimators: list[str]) -> None:
    """Each flag of a comparison in range, before anything is written."""
    from pyro_vae.objectives.registry import estimator_spec

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


def _config(args: argparse.Namespace) -> RunConfig:
    """The config every run of the comparison starts from (each run: its estimator and
    seed)."""
    model: dict[str, Any] = {} if args.guide is None else {"guide": args.guide}
    if args.latent_dims:
        model["latent_dims"] = args.latent_dims
    if args.hidden:
        model["hidden"] = args.hidden
    if args.model:
        model["factory"] = args.model
        model["factory_options"] = model_options(args.model_option)
    return RunConfig(
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
