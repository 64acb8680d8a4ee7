"""``pyro-vae evaluate``: a run folder's model on its test set, printed (or as JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pyro_vae.app.flags import compile_flag
from pyro_vae.errors import UserInputError
from pyro_vae.resources import check_device


def add_parser(commands: Any) -> None:
    """``pyro-vae evaluate`` and its flags, on the subparsers ``commands``."""
    parser = commands.add_parser(
        "evaluate",
        help="test ELBO, importance-sampled log p(x), active units, PSIS k-hat",
        description="Evaluate a run folder's model on its test set: the ELBO with both KL "
        "forms and its two terms, log p(x) importance sampled with K samples (the IWAE "
        "paper: 5000), active units and per-unit KL, PSIS k-hat of the weights. Prints the "
        "estimated time first when it is long; writes nothing into the run folder.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--samples", type=int, default=5000, help="K")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--images", type=int, metavar="N", help="a fixed random subset of N test images"
    )
    parser.add_argument(
        "--ais-steps", type=int, metavar="T", help="also log p(x) by AIS with T annealing steps"
    )
    parser.add_argument("--ais-chains", type=int, default=16, metavar="C", help="AIS chains")
    parser.add_argument("--ais-leapfrog", type=int, default=5, metavar="L", help="per HMC step")
    parser.add_argument(
        "--bdmc", action="store_true", help="with --ais-steps: the BDMC gap on simulated images"
    )
    compile_flag(parser, "the importance weights")


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


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
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
    ).to_dict()
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
