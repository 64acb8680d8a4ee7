"""IS-5000 against AIS against the BDMC gap, for a trained MNIST model of a run folder.

On a fixed random subset of the test images (``--images``; the same subset as
``evaluate --images``): importance-sampled log p(x) with K samples and the PSIS k-hat of
its weights, per image; AIS with T steps, C chains and L leapfrog steps, per image; the
paired difference AIS - IS, overall and split by k-hat; and BDMC's lower and upper bounds
on as many images simulated from the model (their gap bounds the error of AIS with these
settings on data like the model's). Every timing is measured here, and the cost of the
whole test set is scaled from it.

    OMP_NUM_THREADS=1 python benchmarks/ais_mnist.py --run RUN_DIR --images 100 \\
        --steps 500 --chains 16 --leapfrog 5 --out benchmarks/results_ais.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from pyro_vae.analysis.ais import ais_log_likelihood, bdmc
from pyro_vae.analysis.evaluation import fixed_subset, log_likelihood_and_khat
from pyro_vae.analysis.psis import KHAT_THRESHOLD
from pyro_vae.app.runs import load_run

TEST_SET = 10_000


def _mean_sem(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    n = len(values)
    return {
        "mean": float(values.mean()) if n else math.nan,
        "sem": float(values.std() / math.sqrt(n)) if n > 1 else math.nan,
        "n": n,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    config, vae, data, _ = load_run(args.run)
    images = fixed_subset(data.evaluation_images("test"), args.images)
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    is_values, khat = log_likelihood_and_khat(vae, images, args.samples, progress=True)
    is_seconds = time.perf_counter() - began
    ais = ais_log_likelihood(
        vae, images, steps=args.steps, chains=args.chains, leapfrog=args.leapfrog, progress=True
    )
    both = bdmc(
        vae, images, steps=args.steps, chains=args.chains, leapfrog=args.leapfrog, progress=True
    )
    khat_t = torch.as_tensor(khat)
    difference = ais.log_likelihood - is_values
    reliable = khat_t < KHAT_THRESHOLD
    per_image = (ais.seconds + both.forward.seconds + both.reverse.seconds) / len(images)
    return {
        "run": str(args.run),
        "model": {
            "latent_dims": list(config.model.latent_dims),
            "hidden": list(config.model.hidden),
            "epochs": config.train.epochs,
            "estimator": config.train.estimator,
        },
        "images": len(images),
        "importance_sampling": {
            "samples": args.samples,
            "log_likelihood": _mean_sem(is_values),
            "khat_mean": float(khat_t.mean()),
            "khat_share_above_0.7": float((~reliable).double().mean()),
            "seconds": is_seconds,
        },
        "ais": ais.summary(),
        "ais_minus_is": {
            "all": _mean_sem(difference),
            "khat_below_0.7": _mean_sem(difference[reliable]),
            "khat_above_0.7": _mean_sem(difference[~reliable]),
            "share_ais_higher": float((difference > 0).double().mean()),
            "max": float(difference.max()),
        },
        "bdmc": both.summary(),
        "full_test_set_seconds": {
            "importance_sampling": is_seconds / len(images) * TEST_SET,
            "ais_and_bdmc": per_image * TEST_SET,
            "ais": ais.seconds / len(images) * TEST_SET,
        },
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }


def markdown(result: dict[str, Any]) -> str:
    is_, ais, gap = result["importance_sampling"], result["ais"], result["bdmc"]
    diff = result["ais_minus_is"]

    def cell(d: dict[str, float]) -> str:
        return f"{d['mean']:.2f} ± {d['sem']:.2f}" if d["n"] > 1 else "-"

    return "\n".join(
        [
            f"| on {result['images']} test images (nats per image) | value | time |",
            "| --- | --- | --- |",
            f"| IS, K={is_['samples']} | {cell(is_['log_likelihood'])} | {is_['seconds']:.0f} s |",
            f"| AIS, T={ais['steps']}, C={ais['chains']}, L={ais['leapfrog']} (from the guide) "
            f"| {ais['log_likelihood']:.2f} ± {ais['log_likelihood_sem']:.2f} "
            f"(chains' s.e. {ais['chain_standard_error']:.3f}) | {ais['seconds']:.0f} s |",
            f"| AIS − IS, paired, all images | {cell(diff['all'])} | |",
            f"| AIS − IS, {diff['khat_below_0.7']['n']} images with k-hat < 0.7 "
            f"| {cell(diff['khat_below_0.7'])} | |",
            f"| AIS − IS, {diff['khat_above_0.7']['n']} images with k-hat > 0.7 "
            f"| {cell(diff['khat_above_0.7'])} | |",
            f"| BDMC gap (upper − lower) on {gap['points']} simulated images "
            f"| {gap['gap']:.2f} ± {gap['gap_sem']:.2f} (max {gap['gap_max']:.2f}) "
            f"| {gap['seconds']:.0f} s |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder of pyro-vae train")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--samples", type=int, default=5000, help="K of IS")
    parser.add_argument("--steps", type=int, default=500, help="T of AIS")
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--leapfrog", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    result = measure(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(json.dumps(result["full_test_set_seconds"]))


if __name__ == "__main__":
    main()
