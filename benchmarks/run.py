"""Benchmarks: pyro-vae against a pure-PyTorch floor and against Pyro's own VAE example.

Every comparison is measured in this one process and run, with A and B interleaved
(A, B, A, B, ...) and medians reported, so that ratios are not skewed by drift.

- training: ``pyro_vae.fit`` (its ``seconds`` per epoch) against a hand-written PyTorch
  loop of the same network, batches, optimizer (fused Adam) and estimator;
- pyro-example: the configuration of Pyro's ``examples/vae/vae.py`` (784-400 softplus-50,
  batch 256, grey levels with a Bernoulli likelihood, Adam 1e-3, Trace_ELBO, a DataLoader
  over an in-memory tensor dataset), reimplemented here, against ``fit`` on the same
  configuration;
- evaluation: ``pyro_vae.log_likelihood`` (K = 5000) against a plain batched PyTorch
  implementation, with peak memory of each measured in a fresh subprocess;
- small batches: the IWAE protocol's network (784-200-200-50 tanh) at batch 20, one
  thread, per step for mc and IWAE K=5 and K=50, at fresh and at trained parameters;
- scaling: time per step against batch size and against K.

Every row records the torch threads it ran with and the CPU capability torch dispatched
to (``torch.backends.cpu.get_cpu_capability()``).

    python benchmarks/run.py --quick            # under 5 minutes on 2 cores
    python benchmarks/run.py --out benchmarks/results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_vae import ModelConfig, TrainConfig, build_vae, load_data
from pyro_vae.analysis.evaluation import _sizes, log_likelihood
from pyro_vae.app.runs import environment as run_environment
from pyro_vae.data import Split, VAEData
from pyro_vae.models.vae import param_store_registration
from pyro_vae.objectives.capture import CompiledLoss
from pyro_vae.objectives.capture.graphs import GraphCache
from pyro_vae.objectives.registry import make_elbo
from pyro_vae.training.fit import fit
from pyro_vae.training.schedules import make_adam

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import _target, markdown  # noqa: E402 (beside this script)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = ROOT.parent / "shared" / "data" / "mnist"
#: the network of the issue's prototype and of Pyro's example: 784-400 softplus-50
NETWORK = ModelConfig(latent_dims=(50,), hidden=(400,), activation="softplus")
#: the IWAE paper's one-layer network (Burda et al. 2016): 784-200-200-50 tanh
IWAE_NETWORK = ModelConfig(latent_dims=(50,), hidden=(200, 200), activation="tanh")


def host() -> dict[str, Any]:
    """What a timing depends on besides the code: torch's threads and the CPU kernels'
    instruction set (AVX2, AVX512, ...)."""
    return {"threads": torch.get_num_threads(), "cpu_capability": cpu_capability()}


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # pragma: no cover - older torch
        return "unknown"


# ------------------------------------------------------------------------ data
def load(args) -> VAEData:
    folder = args.data_dir or os.environ.get("PYRO_VAE_MNIST_DIR") or DEFAULT_MNIST
    if Path(folder).exists():
        return load_data("mnist", folder, binarize="dynamic")
    print(f"MNIST not found in {folder}: benchmarking on digits instead")
    return load_data("digits", binarize="dynamic")


def subset(data: VAEData, images: int, binarize: str = "dynamic") -> VAEData:
    """``images`` training points; a 10-point test set (fit's per-epoch evaluation stays
    out of its ``seconds``, but it is still run)."""
    train = Split(data.train.images[:images], data.train.labels[:images])
    test = Split(data.test.images[:10], data.test.labels[:10])
    return dataclasses.replace(data, train=train, test=test, binarize=binarize)


def train_subset(data: VAEData, images: int) -> VAEData:
    """The first ``images`` training points, the test set whole (what a whole ``fit``
    call evaluates after its epoch)."""
    train = Split(data.train.images[:images], data.train.labels[:images])
    return dataclasses.replace(data, train=train)


# ------------------------------------------------------------------------ the floor
def floor_loss(vae, x: torch.Tensor, estimator: str, k: int, num_data: int) -> torch.Tensor:
    """The estimator's loss for the data set, written in plain PyTorch (no Pyro)."""
    loc, scale = vae.encoder(x)
    batch = x.shape[0]
    if estimator == "analytic":
        z = loc + scale * torch.randn(k, *loc.shape)
        log_lik = -F.binary_cross_entropy_with_logits(
            vae.decoder(z), x.expand(k, *x.shape), reduction="none"
        ).sum(-1)
        kl = 0.5 * (scale.pow(2) + loc.pow(2) - 1 - 2 * scale.log()).sum(-1)
        elbo = log_lik.mean(0) - kl
        return -elbo.sum() * (num_data / batch)
    eps = torch.randn(k, *loc.shape)
    z = loc + scale * eps
    log_lik = -F.binary_cross_entropy_with_logits(
        vae.decoder(z), x.expand(k, *x.shape), reduction="none"
    ).sum(-1)
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    log_prior = (-0.5 * z.pow(2) - half_log_2pi).sum(-1)
    log_q = (-0.5 * eps.pow(2) - scale.log() - half_log_2pi).sum(-1)
    log_w = log_lik + log_prior - log_q
    if estimator == "mc":
        bound = log_w.mean(0)
    elif estimator == "iwae":
        bound = torch.logsumexp(log_w, 0) - math.log(k)
    else:
        raise ValueError(estimator)
    return -bound.sum() * (num_data / batch)


def floor_epoch(
    vae,
    data: VAEData,
    estimator: str,
    k: int,
    batch_size: int,
    seed: int,
    losses: list[float] | None = None,
) -> float:
    """One epoch of the plain loop; seconds. Same batches, noise, optimizer and step as
    fit: ``seed`` seeds the data order and binarization as fit's data generator, and
    torch's global stream as fit's ``pyro.set_rng_seed`` (so the two draw the same z).
    ``losses``, if given, receives each step's loss."""
    torch.manual_seed(seed)
    optimizer = make_adam(list(vae.parameters()), 1e-3)
    generator = torch.Generator().manual_seed(seed)
    num_data = len(data.train)
    started = time.perf_counter()
    total = 0.0
    for x in data.batches(batch_size, generator):
        optimizer.zero_grad(set_to_none=True)
        loss = floor_loss(vae, x, estimator, k, num_data)
        loss.backward()
        optimizer.step()
        total += loss.item()
        if losses is not None:
            losses.append(loss.item())
    return time.perf_counter() - started


def fit_epoch(vae, data: VAEData, estimator: str, k: int, batch_size: int, seed: int) -> float:
    """The training seconds of a one-epoch ``fit``, replaying captured graphs (the per-step
    comparison: ``compile=True``, so that the short timed epochs do not run eagerly)."""
    config = TrainConfig(
        estimator=estimator, particles=k, epochs=1, batch_size=batch_size, seed=seed, compile=True
    )
    history = fit(vae, data, config, progress=False, log=None)
    return history.last["seconds"]


def captured_graphs(vae) -> int:
    """How many captured graphs ``vae`` holds (its :class:`GraphCache`)."""
    return sum(graph is not None for graph in GraphCache.of(vae).graphs.values())


def fit_call(
    vae, data: VAEData, estimator: str, batch_size: int, k: int = 1, seed: int = 0
) -> float:
    """A whole one-epoch ``fit`` call with its defaults, as a user pays it: the data check,
    building the trainer, the epoch, the per-epoch test evaluation."""
    config = TrainConfig(
        estimator=estimator, particles=k, epochs=1, batch_size=batch_size, seed=seed
    )
    return _timed(lambda: fit(vae, data, config, progress=False, log=None))


def whole_calls(data: VAEData, args) -> list[dict[str, Any]]:
    """Whole one-epoch ``fit`` calls on the full training set against whole epochs of the
    plain loop, alternating, on the same two models throughout (as a user calling ``fit``
    in a loop). The first two calls are reported apart, each saying whether it captured:
    the auto policy captures once the steps made on the model repay the capture (at
    batch 128 in the second one-epoch call, at 256 in the third, which is
    ``interleaved``'s untimed warm-up), and the timed calls replay the graphs. IWAE K=50
    (ten times the arithmetic of a step) trains on the first ``iwae_call_images``
    training images; every call evaluates, after its epoch, on ``fit``'s default
    ``monitor_images`` (2,000 test images). The ratio is the median of ABBA groups of
    two rounds (:func:`compared`), ``call_repeats`` rounds (even)."""
    rows = []
    full = data
    if args.call_images:
        data = subset(data, args.call_images)
    cells = (("mc", 1, 128), ("mc", 1, 256), ("analytic", 1, 128), ("analytic", 1, 256))
    for estimator, k, batch in cells + (("iwae", 50, 128),):
        if k == 50:
            data = train_subset(full, min(args.iwae_call_images, args.call_images or 60000))
        torch.manual_seed(0)
        ours_vae = build_vae(NETWORK, data.data_shape)
        floor_vae = build_vae(NETWORK, data.data_shape)
        first, captured = [], []
        for _ in range(2):  # does a graph pay at this length of call yet? (the auto policy)
            graphs = captured_graphs(ours_vae)
            first.append(fit_call(ours_vae, data, estimator, batch, k))
            captured.append(captured_graphs(ours_vae) > graphs)
        same = SameStart(ours_vae, floor_vae)
        times = interleaved(
            {
                "pyro_vae.fit": same.ours_side(fit_call, data, estimator, batch, k),
                "pytorch floor": same.floor_side(floor_epoch, data, estimator, k, batch),
            },
            args.call_repeats,
            before_round=same.snapshot,
        )
        row = {
            "estimator": estimator,
            "particles": k,
            "batch": batch,
            "images": len(data.train),
            "first_calls_seconds": first,
            "first_calls_captured": captured,
            "ours_seconds": statistics.median(times["pyro_vae.fit"]),
            "floor_seconds": statistics.median(times["pytorch floor"]),
            **compared(times["pyro_vae.fit"], times["pytorch floor"], "abba"),
            "target": 1.05,
            **host(),
        }
        rows.append(row)
        low, high = row["ratio_of_pairs_quartiles"]
        print(
            f"  {estimator:8} K={k:<3} B={batch:<4} {len(data.train)} images: one-epoch fit "
            f"call {row['ours_seconds']:6.2f} s, "
            f"plain epoch {row['floor_seconds']:6.2f} s, ratio {row['ratio']:.3f} (quartiles "
            f"{low:.3f}..{high:.3f}; {_target(1.05)}); first two calls "
            + ", ".join(
                f"{seconds:.2f} s ({'captures' if did else 'eager'})"
                for seconds, did in zip(first, captured)
            ),
            flush=True,
        )
    return rows


def _machine_busy() -> float | None:
    """CPU seconds the whole machine has spent busy (Linux ``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    return sum(int(v) for v in fields[1:4]) / os.sysconf("SC_CLK_TCK")  # user, nice, system


#: CPUs used by other processes during each timed call of the last ``interleaved``
OTHERS: list[float] = []


def _watched(function) -> float:
    """Run ``function`` (which returns its own timing) and note how many CPUs other
    processes used meanwhile: with torch's two OpenMP threads on two cores, one busy
    neighbour makes the threads share a core and spin, and steps take 4-7x longer (for
    fresh and trained parameters alike; measured, not denormal floats)."""
    busy, own, started = _machine_busy(), time.process_time(), time.perf_counter()
    result = function()
    wall = time.perf_counter() - started
    if busy is not None and wall > 0:
        others = ((_machine_busy() - busy) - (time.process_time() - own)) / wall
        OTHERS.append(max(0.0, others))
    return result


def interleaved(
    functions: dict[str, Any], repeats: int, before_round: Any = None
) -> dict[str, list[float]]:
    """Run each function once per round, in turn, for ``repeats`` rounds (after a warm-up).

    The order alternates between rounds (A B, B A, ...), so neither side always runs
    first after the other's caches and allocations. ``before_round``, if given, runs
    (untimed) at the start of the warm-up and of every round. :data:`OTHERS` collects the
    load other processes put on the machine during the timed calls.
    """
    if before_round is not None:
        before_round()
    for function in functions.values():
        function()
    OTHERS.clear()
    times: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for round_ in range(repeats):
        if before_round is not None:
            before_round()
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].append(_watched(functions[name]))
    return times


def compared(ours: list[float], floor: list[float], statistic: str = "pairs") -> dict[str, Any]:
    """The ratio ours / floor of interleaved timings.

    ``statistic="pairs"``: the median over rounds of each round's ratio. The two runs of
    a round are seconds apart, so slow drifts of the machine (its speed varied by a
    factor of three within minutes here, with other work on the host) cancel in each
    ratio; the ratio of the two medians is reported too, and the spread of the
    per-round ratios.

    ``statistic="abba"``: ``interleaved`` reverses the order every round, so two
    consecutive rounds run A B B A (or B A A B); the ratio of a group is the sum of its
    two A times over the sum of its two B times, in which a drift linear over the group
    cancels exactly (in a single round's ratio it does not: the side that ran second
    gains or loses the drift of one call, and the per-round ratios alternate around
    the truth, which widens their spread and lets their median land on either side).
    The headline is the median over groups; it needs an even number of rounds.
    """
    by_round = [a / b for a, b in zip(ours, floor)]
    if statistic == "abba":
        if len(by_round) < 2 or len(by_round) % 2:
            raise ValueError(f"ABBA groups need an even number of rounds, not {len(by_round)}")
        groups = [
            (ours[i] + ours[i + 1]) / (floor[i] + floor[i + 1]) for i in range(0, len(ours), 2)
        ]
    elif statistic == "pairs":
        groups = by_round
    else:
        raise ValueError(statistic)
    ranked = sorted(groups)
    quartiles = statistics.quantiles(ranked, n=4) if len(ranked) > 1 else [ranked[0]] * 3
    result = {
        "ratio": statistics.median(ranked),
        "statistic": statistic,
        "ratio_of_medians": statistics.median(ours) / statistics.median(floor),
        "ratio_of_pairs_quartiles": [quartiles[0], quartiles[2]],
        "ratio_of_pairs_range": [ranked[0], ranked[-1]],
        "rounds": len(by_round),
        "round_ratios": by_round,  # in the order the rounds ran (the spread over time)
        # CPUs other processes used during the timed calls: above ~0.3 the absolute
        # times are inflated (the per-round ratio still compares like with like)
        "others_cpu_median": statistics.median(OTHERS) if OTHERS else None,
        "others_cpu_max": max(OTHERS) if OTHERS else None,
    }
    if statistic == "abba":  # (the quartiles and range above are then the groups')
        result["group_ratios"] = groups
        result["median_of_round_ratios"] = statistics.median(by_round)
    return result


def training(data: VAEData, args) -> list[dict[str, Any]]:
    cases = [
        ("mc", 1, 128),
        ("mc", 1, 256),
        ("analytic", 1, 128),
        ("analytic", 1, 256),
        ("iwae", 5, 128),
        ("iwae", 50, 128),
    ]
    rows = []
    for estimator, k, batch in cases:
        steps = args.steps if k < 50 else max(5, args.steps // 5)
        part = subset(data, steps * batch)
        torch.manual_seed(0)
        ours_vae = build_vae(NETWORK, data.data_shape)
        floor_vae = build_vae(NETWORK, data.data_shape)
        same = SameStart(ours_vae, floor_vae)
        times = interleaved(
            {
                "pyro_vae.fit": same.ours_side(fit_epoch, part, estimator, k, batch),
                "pytorch floor": same.floor_side(floor_epoch, part, estimator, k, batch),
            },
            args.repeats,
            before_round=same.snapshot,
        )
        ours, floor = (
            statistics.median(times[n]) / steps for n in ("pyro_vae.fit", "pytorch floor")
        )
        row = {
            "estimator": estimator,
            "particles": k,
            "batch": batch,
            "steps": steps,
            "ours_ms_per_step": 1e3 * ours,
            "floor_ms_per_step": 1e3 * floor,
            "ours_images_per_s": batch / ours,
            "floor_images_per_s": batch / floor,
            **compared(times["pyro_vae.fit"], times["pytorch floor"]),
            # the targets: mc/analytic at batch 128 and 256, iwae at K=50 (K=5 has none)
            "target": {"mc": 1.05, "analytic": 1.05}.get(estimator, 1.05 if k == 50 else None),
            **host(),
        }
        rows.append(row)
        low, high = row["ratio_of_pairs_quartiles"]
        print(
            f"  {estimator:8} K={k:<3} B={batch:<4} ours {row['ours_ms_per_step']:7.2f} ms  "
            f"floor {row['floor_ms_per_step']:7.2f} ms  ratio {row['ratio']:.3f} "
            f"(quartiles {low:.3f}..{high:.3f}, of medians {row['ratio_of_medians']:.3f}; "
            f"{_target(row['target'])})",
            flush=True,
        )
    return rows


def trained_state(data: VAEData, args) -> dict[str, Any]:
    """Step times at trained parameters, not only fresh ones (numeric slowdowns such as
    denormal floats appear only after training): the network is trained with IWAE K=50
    for ``trained_steps`` steps, then ours and the floor are timed, alternating, at the
    fresh and at the trained parameters, for IWAE K=50 and mc."""
    training = TrainConfig(estimator="iwae", particles=50, epochs=1, batch_size=128, compile=True)
    cells = [("iwae", 50, max(5, args.steps // 5)), ("mc", 1, args.steps)]
    return fresh_and_trained(
        data, NETWORK, training, args.trained_steps, cells, args.trained_repeats, target=1.05
    )


def small_batches(data: VAEData, args) -> dict[str, Any]:
    """The IWAE protocol's small steps: 784-200-200-50 tanh at batch 20, on one thread
    (a step of a few milliseconds: per-step overhead is a large share of it, and a second
    thread mostly waits), mc and IWAE K=5 and K=50, at fresh parameters and after
    ``4 * trained_steps`` steps of IWAE K=5 training. Target: ours / floor <= 1.05, the
    median of ABBA groups (:func:`compared`) of an even number of rounds (``repeats``,
    rounded up)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        training = TrainConfig(estimator="iwae", particles=5, epochs=1, batch_size=20, compile=True)
        cells = [
            ("mc", 1, 3 * args.steps),
            ("iwae", 5, 3 * args.steps),
            ("iwae", 50, max(5, args.steps // 2)),
        ]
        rounds = args.repeats + args.repeats % 2
        return fresh_and_trained(
            data, IWAE_NETWORK, training, 4 * args.trained_steps, cells, rounds, 1.05, "abba"
        )
    finally:
        torch.set_num_threads(threads)


def fresh_and_trained(
    data: VAEData,
    network: ModelConfig,
    training: TrainConfig,
    trained_steps: int,
    cells: list[tuple[str, int, int]],
    repeats: int,
    target: float | None,
    statistic: str = "pairs",
) -> dict[str, Any]:
    """Train a copy of a fresh ``network`` for ``trained_steps`` steps of ``training``, then
    time ours and the floor alternately at the fresh and the trained parameters, for each
    ``(estimator, K, steps per timed epoch)`` of ``cells`` at ``training``'s batch size
    (``statistic``: how rounds make a ratio, see :func:`compared`)."""
    torch.manual_seed(0)
    fresh = build_vae(network, data.data_shape)
    trained = build_vae(network, data.data_shape)
    trained.load_state_dict(fresh.state_dict())
    batch = training.batch_size
    part = subset(data, trained_steps * batch)
    started = time.perf_counter()
    fit(trained, part, training, progress=False, log=None)
    train_seconds = time.perf_counter() - started
    rows = []
    for estimator, k, steps in cells:
        timed = subset(data, steps * batch)
        models = {}
        for state_name, source in (("fresh", fresh), ("trained", trained)):
            for side in ("ours", "floor"):
                model = build_vae(network, data.data_shape)
                model.load_state_dict(source.state_dict())
                models[f"{side}, {state_name}"] = model
        functions = {
            name: partial(_epoch_from, model, copy_state(model), name, timed, estimator, k, batch)
            for name, model in models.items()
        }
        times = interleaved(functions, repeats)
        others = {
            "others_cpu_median": statistics.median(OTHERS) if OTHERS else None,
            "others_cpu_max": max(OTHERS) if OTHERS else None,
        }
        per_step = {name: statistics.median(v) / steps * 1e3 for name, v in times.items()}
        pairs = {
            "ours_over_floor_fresh": ("ours, fresh", "floor, fresh"),
            "ours_over_floor_trained": ("ours, trained", "floor, trained"),
            "trained_over_fresh_ours": ("ours, trained", "ours, fresh"),
            "trained_over_fresh_floor": ("floor, trained", "floor, fresh"),
        }
        row: dict[str, Any] = {
            "estimator": estimator,
            "particles": k,
            "batch": batch,
            "steps": steps,
            "ms_per_step": per_step,
        }
        for key, (a, b) in pairs.items():
            ratio = compared(times[a], times[b], statistic)
            row[key] = ratio["ratio"]
            row[key + "_quartiles"] = ratio["ratio_of_pairs_quartiles"]
        row.update(others, rounds=repeats, statistic=statistic, target=target, **host())
        rows.append(row)
        fresh_q, trained_q = (row[f"ours_over_floor_{s}_quartiles"] for s in ("fresh", "trained"))
        print(
            f"  {estimator:5} K={k:<3} B={batch:<4} ms/step: "
            + ", ".join(f"{name} {value:.2f}" for name, value in per_step.items())
            + f"; ours/floor fresh {row['ours_over_floor_fresh']:.3f} ({fresh_q[0]:.3f}.."
            f"{fresh_q[1]:.3f}), trained {row['ours_over_floor_trained']:.3f} ({trained_q[0]:.3f}"
            f"..{trained_q[1]:.3f}); trained/fresh ours {row['trained_over_fresh_ours']:.3f}, "
            f"floor {row['trained_over_fresh_floor']:.3f} ({torch.get_num_threads()} threads; "
            f"other processes: median {row['others_cpu_median'] or 0:.2f} CPUs; "
            f"{_target(target)})",
            flush=True,
        )
    return {
        "trained_steps": trained_steps,
        "trained_with": f"{training.estimator} K={training.particles} batch {batch}",
        "train_seconds": train_seconds,
        "rows": rows,
    }


def _epoch_from(model, state, name, data, estimator, k, batch) -> float:
    """One timed epoch from the same parameters and the same noise in every round, on
    both sides (seed 1: not the noise the trained parameters were fitted with)."""
    model.load_state_dict(state)
    epoch = fit_epoch if name.startswith("ours") else floor_epoch
    return epoch(model, data, estimator, k, batch, seed=1)


def copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


class SameStart:
    """Both sides of a round start from the same parameters and draw the same noise: ours
    trains on across the rounds (so later rounds time trained parameters), the floor's
    model is reset to ours' parameters at the start of each round before it runs, and
    each round has a seed of its own that both sides use (data order, binarization, z).

    Without the reset the two models drift apart, and where a step's cost depends on the
    parameters the rounds compare different work: IWAE K=50's steps at batch 128 slow
    from about 70 ms to about 200 ms as training goes on, on both sides (denormal floats
    in the gradients of particles with negligible weight make the matrix products
    slower), so the ratio of drifting models spread over 0.97-1.94. Without a new seed
    per round ours replays, every round, the very batches and noise its parameters were
    just fitted to, while the floor drew fresh noise: on those draws the weights are
    more degenerate, and IWAE K=50 read 1.71 (0.8 s against 0.5 s a step after 16
    rounds; at the same seed the floor is as slow as ours, and at a new one ours is as
    fast as the floor: ``benchmarks/same_noise.py``)."""

    def __init__(self, ours: nn.Module, floor: nn.Module) -> None:
        self.ours, self.floor = ours, floor
        self.state = copy_state(ours)
        self.seed = 0

    def snapshot(self) -> None:
        """The start of a round: ours' parameters now, and the round's seed."""
        self.state = copy_state(self.ours)
        self.seed += 1

    def ours_side(self, epoch: Any, *args: Any) -> Any:
        return lambda: epoch(self.ours, *args, seed=self.seed)

    def floor_side(self, epoch: Any, *args: Any) -> Any:
        def run() -> float:
            self.floor.load_state_dict(self.state)
            return epoch(self.floor, *args, seed=self.seed)

        return run


# ------------------------------------------------------------------------ Pyro's example
class ExampleEncoder(nn.Module):
    """As in Pyro's examples/vae/vae.py: 784 -> 400 softplus -> (loc, exp(.))."""

    def __init__(self, z_dim: int = 50, hidden_dim: int = 400) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, 784)
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class ExampleDecoder(nn.Module):
    def __init__(self, z_dim: int = 50, hidden_dim: int = 400) -> None:
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, 784)
        self.softplus = nn.Softplus()

    def forward(self, z):
        return torch.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class ExampleVAE(nn.Module):
    """The model and guide of Pyro's example (probabilities, not logits; site names too)."""

    def __init__(self, z_dim: int = 50, hidden_dim: int = 400) -> None:
        super().__init__()
        self.encoder = ExampleEncoder(z_dim, hidden_dim)
        self.decoder = ExampleDecoder(z_dim, hidden_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z_scale = torch.ones(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder.forward(z)
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, 784),
            )

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder.forward(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


class CachedMNIST(torch.utils.data.Dataset):
    """Like the example's MNISTCached: float images in [0, 1] held in memory, one item per
    index, labels one-hot."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.data = images
        self.targets = F.one_hot(labels, 10).float()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index], self.targets[index]


def example_epoch(vae: ExampleVAE, loader) -> float:
    pyro.clear_param_store()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1.0e-3}), loss=Trace_ELBO())
    started = time.perf_counter()
    epoch_loss = 0.0
    for x, _ in loader:
        epoch_loss += svi.step(x)
    return time.perf_counter() - started


def pyro_example(data: VAEData, args, batch: int = 256, images: int | None = None):
    """Pyro's example against ``fit`` and the floor on its network, at its batch size
    (256) or a smaller one, where Pyro's per-step bookkeeping is a larger share of a
    step: there the target is ours / example <= 0.5 (at 256, the floor's arithmetic)."""
    images = images or args.example_images
    grey = subset(data, images, binarize="none")
    loader = torch.utils.data.DataLoader(
        CachedMNIST(grey.train.images, grey.train.labels),
        batch_size=batch,
        shuffle=True,
        num_workers=0,
        pin_memory=False,
    )
    torch.manual_seed(0)
    theirs = ExampleVAE()
    ours = build_vae(NETWORK, data.data_shape)
    floor_vae = build_vae(NETWORK, data.data_shape)
    pyro.enable_validation(True)  # the example runs with Pyro's default validation
    try:
        times = interleaved(
            {
                "pyro example": lambda: example_epoch(theirs, loader),
                "pyro_vae.fit": partial(fit_epoch, ours, grey, "mc", 1, batch, 0),
                "pytorch floor": partial(floor_epoch, floor_vae, grey, "mc", 1, batch, 0),
            },
            min(args.repeats, 7),  # whole epochs: long enough to average the noise within
        )
    finally:
        pyro.enable_validation(False)
    medians = {name: statistics.median(values) for name, values in times.items()}
    scale = 60000 / images
    against_example = compared(times["pyro_vae.fit"], times["pyro example"])
    result = {
        "batch": batch,
        "images": images,
        "seconds_per_60000_images": {name: value * scale for name, value in medians.items()},
        "ours_over_example": against_example["ratio"],
        "ours_over_example_quartiles": against_example["ratio_of_pairs_quartiles"],
        "ours_over_floor": compared(times["pyro_vae.fit"], times["pytorch floor"])["ratio"],
        "example_over_floor": compared(times["pyro example"], times["pytorch floor"])["ratio"],
        "rounds": against_example["rounds"],
        "others_cpu_median": against_example["others_cpu_median"],
        "target": None if batch > 32 else 0.5,
        "mirrors": "pyro examples/vae/vae.py: 784-400 softplus-50, exp scale, Bernoulli(probs) "
        f"on grey levels, batch {batch} (the example's: 256), pyro.optim.Adam 1e-3, "
        "Trace_ELBO, SVI.step, DataLoader (shuffle, num_workers=0) over in-memory float "
        "images, Pyro validation on",
        **host(),
    }
    per_epoch = result["seconds_per_60000_images"]
    low, high = result["ours_over_example_quartiles"]
    print(
        f"  batch {batch}, per epoch (60,000 images, timed on {images}): example "
        f"{per_epoch['pyro example']:.2f} s, pyro_vae.fit {per_epoch['pyro_vae.fit']:.2f} s, "
        f"floor {per_epoch['pytorch floor']:.2f} s; ours / example "
        f"{result['ours_over_example']:.3f} ({low:.3f}..{high:.3f}; "
        f"{_target(result['target'])}), ours / floor {result['ours_over_floor']:.3f}",
        flush=True,
    )
    return result


# ------------------------------------------------------------------------ evaluation
@torch.no_grad()
def floor_log_likelihood(vae, x: torch.Tensor, k: int, chunk: int = 267, batch: int = 10):
    """Importance-sampled log p(x), plain PyTorch: chunks of samples, float64 log-sum-exp."""
    out = []
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        loc, scale = vae.encoder(xb)
        total = torch.full((len(xb),), -math.inf, dtype=torch.float64)
        for first in range(0, k, chunk):
            size = min(chunk, k - first)
            eps = torch.randn(size, *loc.shape)
            z = loc + scale * eps
            log_lik = -F.binary_cross_entropy_with_logits(
                vae.decoder(z), xb.expand(size, *xb.shape), reduction="none"
            ).sum(-1)
            log_w = (
                log_lik
                + (-0.5 * z.pow(2) - half_log_2pi).sum(-1)
                - (-0.5 * eps.pow(2) - scale.log() - half_log_2pi).sum(-1)
            )
            total = torch.logaddexp(total, torch.logsumexp(log_w.double(), 0))
        out.append(total - math.log(k))
    return torch.cat(out)


def _evaluation_inputs(args):
    data = load(args)
    torch.manual_seed(0)
    vae = build_vae(NETWORK, data.data_shape)
    x = data.evaluation_images("test")[: args.eval_points]
    return vae, x


def evaluation(args) -> dict[str, Any]:
    """Rounds of 20 points (cycling through ``eval_points``), ours and the floor in turn,
    with the floor using the same chunks of samples as ``log_likelihood``."""
    vae, x = _evaluation_inputs(args)
    pyro.enable_validation(False)
    per_round = min(20, len(x))
    chunk, batch = _sizes(x[:per_round], 5000, None, None)
    starts = {side: itertools.cycle(range(0, len(x), per_round)) for side in ("ours", "floor")}

    def points(side: str) -> torch.Tensor:
        start = next(starts[side])
        return x[start : start + per_round]

    times = interleaved(
        {
            # compile=True: the graph a whole test set's evaluation uses (20 points alone
            # would not repay a capture, and the auto policy would stay eager)
            "pyro_vae.log_likelihood": lambda: _timed(
                partial(log_likelihood, vae, points("ours"), 5000, compile=True)
            ),
            "pytorch floor": lambda: _timed(
                partial(floor_log_likelihood, vae, points("floor"), 5000, chunk, batch)
            ),
        },
        3 * args.repeats,
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    memory = {name: _peak_memory(name, args) for name in ("ours", "floor")}
    result = {
        "points": len(x),
        "points_per_round": per_round,
        "samples": 5000,
        "chunk": chunk,
        "seconds_per_1000_points": {n: v * 1000 / per_round for n, v in medians.items()},
        **compared(times["pyro_vae.log_likelihood"], times["pytorch floor"]),
        "peak_memory_mb": memory,
        "target": 1.10,
    }
    per_1000 = result["seconds_per_1000_points"]
    print(
        f"  log p(x), K=5000, chunks of {chunk}: ours {per_1000['pyro_vae.log_likelihood']:.1f}"
        f" s, floor {per_1000['pytorch floor']:.1f} s per 1000 points, ratio "
        f"{result['ratio']:.3f} (of medians {result['ratio_of_medians']:.3f}; target <= 1.10);"
        f" peak memory ours {memory['ours']:.0f} MB, floor {memory['floor']:.0f} MB",
        flush=True,
    )
    return result


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _peak_memory(which: str, args) -> float:
    """Peak resident memory added by one evaluation, in a fresh process (MB)."""
    argv = [
        sys.executable,
        __file__,
        "--memory-probe",
        which,
        "--eval-points",
        str(args.eval_points),
    ]
    if args.data_dir:
        argv += ["--data-dir", str(args.data_dir)]
    output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return float(output.strip().splitlines()[-1])


def memory_probe(which: str, args) -> None:
    """In a fresh process: the model and random binary images only (no data set loaded,
    whose decompression would dominate the peak), then one evaluation.

    Reports the high-water mark of resident memory during the evaluation minus the
    resident memory before it. The high-water mark is reset first (Linux
    ``/proc/self/clear_refs``), because importing torch and Pyro can leave a peak above
    anything the evaluation reaches, which would hide it behind ``ru_maxrss``."""
    if which == "capture-machinery":
        reset = _reset_peak_rss()
        before = _status_kb("VmRSS")
        started = time.perf_counter()
        _load_capture_machinery()
        seconds = time.perf_counter() - started
        print(seconds, (_status_kb("VmHWM" if reset else "VmRSS") - before) / 1024)
        return
    _load_capture_machinery()  # once per process, for both sides (measured on its own)
    torch.manual_seed(0)
    vae = build_vae(NETWORK, (1, 28, 28))
    x = torch.bernoulli(torch.full((args.eval_points, 784), 0.3))
    pyro.enable_validation(False)
    reset = _reset_peak_rss()
    before = _status_kb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if which == "ours":
        log_likelihood(vae, x, 5000, compile=True)
    else:
        floor_log_likelihood(vae, x, 5000)
    after = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)  # both in kB


def _load_capture_machinery() -> None:
    """The first graph capture of a process imports torch's tracing stack (make_fx pulls
    in torch._dynamo, sympy, ...): a one-time cost, reported on its own."""
    from torch.fx.experimental.proxy_tensor import make_fx

    make_fx(lambda t: t + 1, tracing_mode="fake")(torch.ones(1))


def capture_cost(args) -> dict[str, float]:
    """One-time costs of pyro_vae.objectives.capture: loading torch's tracing stack (fresh
    process), and capturing plus checking one training graph (mc, batch 128)."""
    argv = [sys.executable, __file__, "--memory-probe", "capture-machinery"]
    output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    load_seconds, load_mb = (float(v) for v in output.strip().splitlines()[-1].split())
    _load_capture_machinery()
    torch.manual_seed(0)
    vae = build_vae(NETWORK, (1, 28, 28))
    x = torch.bernoulli(torch.full((128, 784), 0.3))
    step = CompiledLoss(make_elbo("mc"), vae)
    with param_store_registration(vae, False):
        first = _timed(lambda: step.loss_and_grads(x, num_data=60000))
        replays = [_timed(lambda: step.loss_and_grads(x, num_data=60000)) for _ in range(20)]
    result = {
        "machinery_load_seconds": load_seconds,
        "machinery_load_mb": load_mb,
        "first_step_seconds": first,
        "replayed_step_seconds": statistics.median(replays),
        "capture_seconds": step.capture_seconds,
    }
    print(
        f"  one-time: torch's tracing stack {load_seconds:.2f} s and {load_mb:.0f} MB per "
        f"process; capturing + checking the mc graph (batch 128) {step.capture_seconds:.3f} s "
        f"(the first step {first * 1e3:.0f} ms, a replayed step "
        f"{result['replayed_step_seconds'] * 1e3:.1f} ms)",
        flush=True,
    )
    return result


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# ------------------------------------------------------------------------ scaling
def scaling(data: VAEData, args) -> dict[str, Any]:
    rows = []
    steps = max(5, args.steps // 4)
    for estimator, k, batch in [("mc", 1, b) for b in args.batches] + [
        ("iwae", k, 128) for k in args.particles
    ]:
        part = subset(data, steps * batch)
        torch.manual_seed(0)
        ours_vae = build_vae(NETWORK, data.data_shape)
        floor_vae = build_vae(NETWORK, data.data_shape)
        same = SameStart(ours_vae, floor_vae)
        times = interleaved(
            {
                "ours": same.ours_side(fit_epoch, part, estimator, k, batch),
                "floor": same.floor_side(floor_epoch, part, estimator, k, batch),
            },
            max(1, args.repeats // 2),
            before_round=same.snapshot,
        )
        ours, floor = (statistics.median(times[n]) / steps * 1e3 for n in ("ours", "floor"))
        row = {
            "estimator": estimator,
            "particles": k,
            "batch": batch,
            "ours_ms_per_step": ours,
            "floor_ms_per_step": floor,
            **compared(times["ours"], times["floor"]),
            **host(),
        }
        rows.append(row)
        print(
            f"  {estimator:5} K={k:<4} B={batch:<5} ours {ours:8.2f} ms  floor {floor:8.2f} ms  "
            f"ratio {row['ratio']:.3f}",
            flush=True,
        )
    return {"rows": rows}


# ------------------------------------------------------------------------ main
def environment() -> dict[str, Any]:
    """The runs' own environment record, plus the processor."""
    return {
        **run_environment(),
        "processor": platform.processor() or platform.machine(),
        "cpu_capability": cpu_capability(),
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The checkout's commit, with ``+changes`` when its tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    except OSError:
        return None
    return (head + ("+changes" if dirty else "")) or None


#: the keys of results.json each section writes
SECTION_KEYS = {
    "training": ("training", "capture"),
    "whole-calls": ("whole_calls",),
    "small-batches": ("small_batches",),
    "trained-state": ("trained_state",),
    "pyro-example": ("pyro_example", "pyro_example_small"),
    "evaluation": ("evaluation",),
    "scaling": ("scaling",),
}


def updated(path: Path, result: dict[str, Any], sections: list[str]) -> dict[str, Any]:
    """The results in ``path`` with the keys of ``sections`` replaced by this run's; each
    replaced section records the environment (commit included) it was measured in."""
    merged = json.loads(path.read_text())
    runs = merged.setdefault("section_runs", {})
    for section in sections:
        for key in SECTION_KEYS[section]:
            if key in result:
                merged[key] = result[key]
        runs[section] = {**result["environment"], "seconds": result["seconds"]}
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (< 5 min)")
    parser.add_argument("--data-dir", type=Path, help="MNIST IDX folder (default ../shared)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace only the sections run in --out, keeping the others",
    )
    parser.add_argument(
        "--sections",
        default="training,whole-calls,small-batches,trained-state,pyro-example,evaluation,scaling",
    )
    parser.add_argument("--trained-steps", type=int, help="IWAE-50 steps before timing")
    parser.add_argument("--trained-repeats", type=int, help="rounds at trained parameters")
    parser.add_argument("--steps", type=int, help="gradient steps per timed epoch")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per comparison")
    parser.add_argument(
        "--call-repeats", type=int, help="rounds of whole one-epoch calls (even: ABBA groups)"
    )
    parser.add_argument(
        "--call-images", type=int, help="training images for whole calls (default all)"
    )
    parser.add_argument("--eval-points", type=int, help="test points for log p(x)")
    parser.add_argument("--example-images", type=int, help="images per example epoch")
    parser.add_argument(
        "--example-small-images", type=int, help="images per example epoch at batch 32 and 20"
    )
    parser.add_argument(
        "--iwae-call-images", type=int, help="training images for whole IWAE K=50 calls"
    )
    parser.add_argument(
        "--memory-probe", choices=("ours", "floor", "capture-machinery"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (20 if quick else 60)
    args.repeats = args.repeats or (7 if quick else 21)
    args.call_repeats = args.call_repeats or (4 if quick else 14)  # even: ABBA groups
    if args.call_repeats % 2:  # (refused before any section runs, not after some have)
        parser.error(f"--call-repeats must be even (ABBA groups), not {args.call_repeats}")
    args.trained_steps = args.trained_steps or (60 if quick else 469)
    args.trained_repeats = args.trained_repeats or (3 if quick else 7)
    args.eval_points = args.eval_points or (20 if quick else 200)
    args.example_images = args.example_images or (15360 if quick else 60000)
    args.example_small_images = args.example_small_images or (2560 if quick else 10240)
    args.iwae_call_images = args.iwae_call_images or (2560 if quick else 10240)
    args.batches = (32, 128, 512) if quick else (32, 64, 128, 256, 512, 1024)
    args.particles = (1, 10, 50) if quick else (1, 5, 10, 50, 100)
    if args.memory_probe:
        memory_probe(args.memory_probe, args)
        return
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    pyro.enable_validation(False)
    data = load(args)
    result: dict[str, Any] = {
        "environment": environment(),
        "quick": quick,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    print(f"pyro-vae benchmarks ({'quick' if quick else 'full'}): {result['environment']}")
    started = time.perf_counter()
    if "training" in sections:
        print("training throughput, 784-400 softplus-50 MLP, fused Adam both sides:")
        result["training"] = training(data, args)
        result["capture"] = capture_cost(args)
    if "whole-calls" in sections:
        print("whole one-epoch fit calls against whole plain epochs (full training set):")
        result["whole_calls"] = whole_calls(data, args)
    if "small-batches" in sections:
        print("small batches: the IWAE protocol's 784-200-200-50 tanh at batch 20, one thread:")
        result["small_batches"] = small_batches(data, args)
    if "trained-state" in sections:
        print("fresh against trained parameters (IWAE K=50 training first):")
        result["trained_state"] = trained_state(data, args)
    if "pyro-example" in sections:
        print("against Pyro's examples/vae/vae.py configuration:")
        result["pyro_example"] = pyro_example(data, args)
        result["pyro_example_small"] = [
            pyro_example(data, args, batch, args.example_small_images) for batch in (32, 20)
        ]
    if "evaluation" in sections:
        print("evaluation throughput:")
        result["evaluation"] = evaluation(args)
    if "scaling" in sections:
        print("scaling (time per step against batch size, then against K):")
        result["scaling"] = scaling(data, args)
    result["seconds"] = time.perf_counter() - started
    if args.update:
        result = updated(args.out, result, sections)
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['seconds']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
