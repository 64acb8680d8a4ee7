"""Why IWAE K=50 steps slow down as training goes on: denormal floats in the gradients.

Trains the benchmark network (784-400 softplus-50, batch 128) with the plain PyTorch
loop of ``run.py`` for ``--steps`` steps of IWAE K=50, then times steps of that loop at
the fresh and at the trained parameters on one thread, with ``torch.set_flush_denormal``
off and on (alternating), and counts the denormal entries of the gradient of the loss
with respect to the decoder's logits. On this host (2-core AMD EPYC, AVX-512) the
trained steps were 1.3-1.5x slower with denormals kept (two runs) and as fast as the fresh ones
with them flushed: particles whose normalized importance weight is below float32's
smallest normal number (1.2e-38) pass denormal gradients into the decoder's matrix
products. Both the library and the floor pay this; ``run.py`` therefore times both
sides from the same parameters and with the same noise in every round (its
``SameStart``; ``same_noise.py`` shows what the noise alone does).

    python benchmarks/denormals.py --data-dir DIR      # about 2 minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 (the benchmark's network, data and plain loop)

from pyro_vae import build_vae  # noqa: E402


def denormal_share(vae, x: torch.Tensor, k: int) -> float:
    """Share of the entries of d(-L_K)/d(logits) that are denormal (nonzero, below tiny)."""
    loc, scale = vae.encoder(x)
    eps = torch.randn(k, *loc.shape)
    z = loc + scale * eps
    logits = vae.decoder(z)
    logits.retain_grad()
    log_lik = -F.binary_cross_entropy_with_logits(
        logits, x.expand(k, *x.shape), reduction="none"
    ).sum(-1)
    log_w = log_lik + (-0.5 * z.pow(2)).sum(-1) - (-0.5 * eps.pow(2) - scale.log()).sum(-1)
    (-(torch.logsumexp(log_w, 0) - math.log(k)).sum()).backward()
    grad = logits.grad
    tiny = torch.finfo(torch.float32).tiny
    return ((grad != 0) & (grad.abs() < tiny)).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="MNIST IDX folder (default ../shared)")
    parser.add_argument("--steps", type=int, default=160, help="IWAE K=50 training steps")
    parser.add_argument("--timed-steps", type=int, default=5, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per cell")
    args = parser.parse_args(argv)
    pyro.enable_validation(False)
    data = run.load(args)
    torch.manual_seed(0)
    fresh = build_vae(run.NETWORK, data.data_shape)
    trained = copy.deepcopy(fresh)
    run.floor_epoch(trained, run.subset(data, args.steps * 128), "iwae", 50, 128, 0)
    torch.set_num_threads(1)  # set_flush_denormal acts on the calling thread only
    timed = run.subset(data, args.timed_steps * 128)
    x = next(iter(timed.batches(128, torch.Generator().manual_seed(0))))
    result: dict = {"threads": 1, "steps_trained": args.steps, "cells": {}}
    for name, model in (("fresh", fresh), ("trained", trained)):
        times: dict[str, list[float]] = {"denormals kept": [], "denormals flushed": []}
        for _ in range(args.rounds):
            for flush in (False, True):
                torch.set_flush_denormal(flush)
                seconds = run.floor_epoch(copy.deepcopy(model), timed, "iwae", 50, 128, 1)
                times["denormals flushed" if flush else "denormals kept"].append(seconds)
        torch.set_flush_denormal(False)
        cell = {key: 1e3 * statistics.median(v) / args.timed_steps for key, v in times.items()}
        cell["denormal_share_of_logit_gradient"] = denormal_share(copy.deepcopy(model), x, 50)
        result["cells"][name] = cell
        print(
            f"{name:8} ms/step: kept {cell['denormals kept']:.1f}, flushed "
            f"{cell['denormals flushed']:.1f}; denormal share of d/dlogits "
            f"{cell['denormal_share_of_logit_gradient']:.2e}",
            flush=True,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
