"""Reference results: a short end-to-end training run per estimator, over several seeds.

Each estimator in the registry trains the same small VAE on the built-in 8x8 digits
(offline) for a few epochs with K particles, from each seed; then the test ELBO, its KL
term and the importance-sampled log p(x) are measured on the test split. The spread over
seeds gives each number a band; ``tests/test_reference.py`` trains one seed of each
estimator again and fails when a change leaves the band. A scale bug that trains the
wrong objective moves these numbers by tens of nats; the seed spread is a fraction of
one.

    python benchmarks/reference_runs.py                 # writes tests/reference/estimators.json
    python benchmarks/reference_runs.py --check         # one seed each, against the file
    python benchmarks/reference_runs.py --only a,b      # add or remake these, keep the rest
    python benchmarks/reference_runs.py --mnist DIR     # the MNIST golden band (slow test)

The runs use one torch thread, so that the numbers do not depend on the machine's core
count (float32 sums split over threads round differently).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "tests" / "reference" / "estimators.json"

#: The run every reference number comes from (kept in the file beside the numbers).
SETTINGS: dict[str, Any] = {
    "dataset": "digits",
    "latent_dims": [4],
    "hidden": [32],
    "particles": 5,
    "epochs": 4,
    "batch_size": 100,
    "lr": 0.01,
    "eval_samples": 100,
    "eval_images": 200,
}
#: The short MNIST run of the golden band (tests/reference/mnist.json, a slow test):
#: the IWAE paper's network on 10,000 training images for three epochs
MNIST_SETTINGS: dict[str, Any] = {
    "dataset": "mnist",
    "latent_dims": [50],
    "hidden": [200, 200],
    "particles": 5,
    "epochs": 3,
    "batch_size": 100,
    "lr": 0.001,
    "eval_samples": 100,
    "eval_images": 500,
    "limit": 10000,
}
MNIST_ESTIMATORS = ("mc", "iwae", "stl", "dreg")
MNIST_OUTPUT = REPO / "tests" / "reference" / "mnist.json"
SEEDS = (0, 1, 2, 3, 4)
METRICS = ("test_elbo", "test_kl", "test_log_likelihood")
#: the band: mean +- this many standard deviations over the seeds, and never narrower
#: than FLOOR nats (five seeds estimate a spread roughly; thread-count rounding moves a
#: run by far less than FLOOR)
SIGMAS = 4.0
FLOOR = 0.5


@dataclass(frozen=True)
class RunResult:
    """One estimator trained from one seed: the numbers and the seconds it took."""

    estimator: str
    seed: int
    metrics: dict[str, float]
    seconds: float


def train_once(
    estimator: str, seed: int, settings: dict[str, Any] = SETTINGS, data_dir: Any = None
) -> RunResult:
    """Train the reference model with ``estimator`` from ``seed`` and measure it."""
    import pyro_vae as pv

    torch.set_num_threads(1)
    started = time.perf_counter()
    data = pv.load_data(settings["dataset"], data_dir, seed=seed, limit=settings.get("limit"))
    model_config = pv.ModelConfig(
        latent_dims=tuple(settings["latent_dims"]), hidden=tuple(settings["hidden"])
    )
    train_config = pv.TrainConfig(
        estimator=estimator,
        particles=settings["particles"],
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        seed=seed,
        eval_samples=0,
        compile=False,
    )
    pyro.set_rng_seed(seed)
    vae = pv.build_vae(model_config, data.data_shape)
    pv.fit(vae, data, train_config, progress=False, log=None)
    images = data.evaluation_images("test")[: settings["eval_images"]]
    result = pv.evaluate(vae, images, num_samples=settings["eval_samples"])
    metrics = {name: float(getattr(result, name)) for name in METRICS}
    return RunResult(estimator, seed, metrics, time.perf_counter() - started)


def band(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation over seeds, and the band a new run must fall in."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    half = max(SIGMAS * spread, FLOOR)
    return {"mean": mean, "sd": spread, "low": mean - half, "high": mean + half}


def main(argv: list[str] | None = None) -> int:
    from pyro_vae.objectives.registry import ESTIMATORS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="one seed each, against the file")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated estimators to run, merged into the file (the others' "
        "entries are kept as they are)",
    )
    parser.add_argument(
        "--mnist", type=Path, default=None, help="MNIST IDX folder: the golden band"
    )
    args = parser.parse_args(argv)
    if args.mnist is not None:
        return write_bands(
            MNIST_ESTIMATORS, MNIST_SETTINGS, (0, 1, 2), args.out or MNIST_OUTPUT, args.mnist
        )
    args.out = args.out or OUTPUT
    if args.check:
        reference = json.loads(args.out.read_text())
        failures = 0
        for estimator, expected in reference["estimators"].items():
            run = train_once(estimator, reference["check_seed"], reference["settings"])
            for name, value in run.metrics.items():
                limits = expected[name]
                inside = limits["low"] <= value <= limits["high"]
                failures += not inside
                print(
                    f"{estimator:9s} {name:20s} {value:9.3f}  band "
                    f"[{limits['low']:.3f}, {limits['high']:.3f}]  {'ok' if inside else 'OUT'}"
                )
        return 1 if failures else 0
    if args.only:
        only = tuple(name.strip() for name in args.only.split(",") if name.strip())
        unknown = [name for name in only if name not in ESTIMATORS]
        if unknown:
            parser.error(f"unknown estimators {unknown}: choose from {', '.join(ESTIMATORS)}")
        kept = json.loads(args.out.read_text())
        if kept["settings"] != SETTINGS or kept["seeds"] != list(SEEDS):
            parser.error(f"{args.out} was made with other settings: remake it whole")
        return write_bands(
            only, SETTINGS, SEEDS, args.out, keep=kept["estimators"], what=kept.get("what")
        )
    return write_bands(tuple(ESTIMATORS), SETTINGS, SEEDS, args.out)


def write_bands(
    estimators: tuple[str, ...],
    settings: dict[str, Any],
    seeds: tuple[int, ...],
    out: Path,
    data_dir: Any = None,
    keep: dict[str, Any] | None = None,
    what: str | None = None,
) -> int:
    """Train each estimator from each seed, print the spread, write the bands to ``out``
    (after the entries of ``keep``, other estimators' bands kept as they are)."""
    results: dict[str, Any] = {
        name: entry for name, entry in (keep or {}).items() if name not in estimators
    }
    for estimator in estimators:
        runs = [train_once(estimator, seed, settings, data_dir) for seed in seeds]
        results[estimator] = {
            name: {
                "seeds": [run.metrics[name] for run in runs],
                **band([run.metrics[name] for run in runs]),
            }
            for name in METRICS
        }
        seconds = statistics.fmean(run.seconds for run in runs)
        spread = "  ".join(
            f"{n} {results[estimator][n]['mean']:8.3f} ± {results[estimator][n]['sd']:.3f}"
            for n in METRICS
        )
        print(f"{estimator:9s} {spread}  ({seconds:.1f} s a run)", flush=True)
    payload = {
        "what": what
        or "short end-to-end runs per estimator; band = mean +- "
        f"max({SIGMAS} sd, {FLOOR}) over the seeds; made by benchmarks/reference_runs.py",
        "settings": settings,
        "seeds": list(seeds),
        "check_seed": seeds[0],
        "torch": torch.__version__,
        "estimators": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(math.isfinite(v["mean"]) for r in results.values() for v in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
