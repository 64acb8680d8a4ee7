"""Where a whole one-epoch ``fit`` call's time goes, beside a plain epoch.

``run.py``'s whole-call cells time a ``fit`` call as a user pays it against one epoch of
the plain loop. The call does more than the epoch: after it, ``fit`` evaluates the test
ELBO and the active units over 2,000 test images (its default ``monitor_images``; the
``Evaluation`` callback, whose time the epoch's record keeps as ``eval_seconds``),
which the plain loop does not. This script
splits each call into its training seconds (the record's ``seconds``), its evaluation
and the rest (data check, trainer, history), and times the plain epoch from the same
parameters and seed in the same round (which side runs first alternates), for the full
training set at one batch size.

    python benchmarks/call_parts.py --data-dir DIR --batch 256     # about 1 minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 (the benchmark's network, data and plain loop)

from pyro_vae import TrainConfig, build_vae  # noqa: E402
from pyro_vae.training.fit import fit  # noqa: E402

#: at most this many first calls go untimed (a short epoch may never capture)
MAX_FIRST_CALLS = 4


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="MNIST IDX folder (default ../shared)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--estimator", default="mc", choices=("mc", "analytic"))
    parser.add_argument("--rounds", type=int, default=9, help="timed calls (after the first)")
    parser.add_argument("--images", type=int, help="train on the first N images (tests)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    pyro.enable_validation(False)
    data = run.load(args)
    if args.images:
        data = run.train_subset(data, args.images)
    torch.manual_seed(0)
    ours = build_vae(run.NETWORK, data.data_shape)
    floor = build_vae(run.NETWORK, data.data_shape)
    parts: dict[str, list[float]] = {"call": [], "training": [], "evaluation": [], "rest": []}
    parts["plain epoch"] = []

    def graphs() -> int:
        return run.captured_graphs(ours)

    def one_round(seed: int) -> tuple[float, dict, float]:
        """A ``fit`` call and a plain epoch from the same parameters and seed (which side
        runs first alternates): the call's seconds, its epoch record, the epoch's seconds."""
        floor.load_state_dict(ours.state_dict())
        config = TrainConfig(estimator=args.estimator, epochs=1, batch_size=args.batch, seed=seed)

        def plain() -> float:
            return run.floor_epoch(floor, data, args.estimator, 1, args.batch, seed=seed)

        def call() -> tuple[float, dict]:
            started = time.perf_counter()
            record = fit(ours, data, config, progress=False, log=None).last
            return time.perf_counter() - started, record

        if seed % 2:
            plain_seconds = plain()
            return (*call(), plain_seconds)
        return (*call(), plain())

    # the first calls go untimed: eager until capturing pays, then the one that captures
    warming, untimed, seed = True, 0, 0
    while len(parts["call"]) < args.rounds:
        before = graphs()
        seconds, record, plain = one_round(seed)
        seed += 1
        warming = warming and untimed < MAX_FIRST_CALLS and (not graphs() or graphs() > before)
        if warming:
            untimed += 1
            continue
        parts["call"].append(seconds)
        parts["training"].append(record["seconds"])
        parts["evaluation"].append(record["eval_seconds"])
        parts["rest"].append(seconds - record["seconds"] - record["eval_seconds"])
        parts["plain epoch"].append(plain)
    result = {
        "estimator": args.estimator,
        "batch": args.batch,
        "images": len(data.train),
        "test_images": record["test_images"],  # evaluated after each epoch
        "rounds": len(parts["call"]),
        "untimed_first_calls": untimed,
        "median_seconds": {name: statistics.median(values) for name, values in parts.items()},
        "call_over_plain_epoch": run.compared(parts["call"], parts["plain epoch"])["ratio"],
        "training_over_plain_epoch": run.compared(parts["training"], parts["plain epoch"])["ratio"],
        "evaluation_share_of_call": statistics.median(
            e / c for e, c in zip(parts["evaluation"], parts["call"])
        ),
        **run.host(),
    }
    for name, value in result["median_seconds"].items():
        print(f"  {name:12} {value:7.3f} s", flush=True)
    print(
        f"  call / plain epoch {result['call_over_plain_epoch']:.3f}, training / plain epoch "
        f"{result['training_over_plain_epoch']:.3f}, evaluation "
        f"{100 * result['evaluation_share_of_call']:.1f}% of the call"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
