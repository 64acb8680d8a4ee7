"""What the finite check before each step costs inside the captured graph, now and before.

Before each optimizer step ``fit`` checks that the gradients are finite and that their
squares fit in float32 (Adam keeps them). The captured graph reduces each gradient as it
is produced: since 3afe42f to its sum of squares, one BLAS dot per gradient
(``capture.compiled.square_sum``, the bound the check reads first); before, to its
largest entry, one ``aminmax`` pass per gradient. This script times replayed steps of
both versions under ``torch.profiler`` (the earlier one patched back in, alternating,
fresh model and capture each time) and prints the self CPU time of the reducing
operations per step (``aten::dot``, against ``aten::aminmax``), for the two shapes the
speed targets use: mc at batch 128 on the benchmark's 784-400-50 network on two
threads, and IWAE K=5 at batch 20 on the IWAE protocol's 784-200-200-50 on one.

    python benchmarks/finite_check.py --data-dir DIR          # about a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pyro
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 (the benchmark's networks, data and fit_epoch)

from pyro_vae import build_vae  # noqa: E402
from pyro_vae.objectives.capture import compiled  # noqa: E402

#: (name, estimator, K, batch, network, threads, steps per profiled epoch)
CASES = (
    ("mc, batch 128, 784-400-50, 2 threads", "mc", 1, 128, run.NETWORK, 2, 100),
    ("iwae K=5, batch 20, 784-200-200-50, 1 thread", "iwae", 5, 20, run.IWAE_NETWORK, 1, 180),
)
#: the reducing operation of each version
OPERATIONS = {"square sum (now)": "aten::dot", "largest entry (before)": "aten::aminmax"}


def largest_squared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The check's reduction before 3afe42f (the largest entry, here squared so that the
    trainer reads it as it reads the square sum): one aminmax pass per gradient."""
    extremes = [torch.aminmax(t) for t in tensors]
    low = torch.stack([low for low, _ in extremes]).amin()
    high = torch.stack([high for _, high in extremes]).amax()
    return torch.maximum(high, -low).square()


def per_step_ms(version: str, case: tuple, data, steps: int | None = None) -> float:
    """Self CPU milliseconds per step of ``version``'s reducing operation over one
    profiled epoch of replayed steps (captured beforehand, untimed; ``steps``: the
    epoch's length, if not the case's)."""
    _, estimator, k, batch, network, threads, case_steps = case
    steps = steps or case_steps
    torch.set_num_threads(threads)
    timed = run.subset(data, steps * batch)
    original = compiled.square_sum
    if version != "square sum (now)":
        compiled.square_sum = largest_squared  # (read by the graph's capture)
    try:
        torch.manual_seed(0)
        vae = build_vae(network, data.data_shape)
        run.fit_epoch(vae, timed, estimator, k, batch, seed=1)  # captures
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            run.fit_epoch(vae, timed, estimator, k, batch, seed=2)
    finally:
        compiled.square_sum = original
    operation = OPERATIONS[version]
    total = sum(e.self_cpu_time_total for e in profiled.key_averages() if e.key == operation)
    return total / steps / 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="MNIST IDX folder (default ../shared)")
    parser.add_argument("--rounds", type=int, default=3, help="profiled epochs of each")
    parser.add_argument("--steps", type=int, help="steps per profiled epoch (tests)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    pyro.enable_validation(False)
    data = run.load(args)
    threads = torch.get_num_threads()
    result: dict = {"cases": []}
    for case in CASES:
        times: dict[str, list[float]] = {version: [] for version in OPERATIONS}
        for round_ in range(args.rounds):
            order = list(OPERATIONS) if round_ % 2 == 0 else list(reversed(OPERATIONS))
            for version in order:
                times[version].append(per_step_ms(version, case, data, args.steps))
        medians = {version: statistics.median(values) for version, values in times.items()}
        result["cases"].append({"case": case[0], "ms_per_step": medians, "rounds": args.rounds})
        print(
            f"  {case[0]}: "
            + ", ".join(f"{version} {ms:.3f} ms/step" for version, ms in medians.items()),
            flush=True,
        )
    torch.set_num_threads(threads)
    result.update(run.host())
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
