"""``pyro-vae estimators``: the registry's estimators, or one, as text."""

from __future__ import annotations

import argparse
from typing import Any

from pyro_vae.objectives.registry import ESTIMATORS


def add_parser(commands: Any) -> None:
    """``pyro-vae estimators`` and its flags, on the subparsers ``commands``."""
    parser = commands.add_parser(
        "estimators",
        help="list the estimators: what each is, its options, what it claims",
        description="Each registered estimator (or the one an import path names) with its "
        "summary, paper, options (type and default) and claims: a lower bound, a value, "
        "the closed-form KL, how its loss is captured.",
    )
    parser.add_argument(
        "estimator", nargs="?", metavar="NAME|PATH", help="one estimator (default: all)"
    )


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """``pyro-vae estimators``: the registry, or one estimator, as text."""
    from pyro_vae.objectives.registry import describe_estimator, estimator_spec

    specs = [estimator_spec(args.estimator)] if args.estimator else list(ESTIMATORS.values())
    print("\n\n".join(describe_estimator(spec) for spec in specs))
    return 0
