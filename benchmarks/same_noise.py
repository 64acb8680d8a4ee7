"""Why the per-step IWAE K=50 benchmark once read 1.71: the noise, not the code.

``run.py``'s training cells train ours on from round to round and reset the floor to
ours' parameters before each of its rounds (``SameStart``). They used to call ``fit``
with seed 0 every round, while the plain loop drew its z from torch's global stream
wherever it stood: ours replayed, every round, the very batches and noise its
parameters had just been fitted to, where the importance weights are the most
degenerate (more particles with a normalized weight below float32's smallest normal
number, whose denormal gradients slow the decoder's matrix products). This script
trains a model that way (``--rounds`` one-epoch ``fit`` calls of ``--steps`` steps, IWAE
K=50, batch 128, seed 0 each), then times, alternating, ours and the floor from the
trained parameters at the seed it was trained with and at new seeds. Both sides are
seeded alike (``floor_epoch`` seeds torch's stream as ``fit`` does, so they draw the same
z), and each side's time depends on the seed, not on the side.

    python benchmarks/same_noise.py --data-dir DIR      # about 6 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 (the benchmark's network, data, fit epoch and plain loop)

from pyro_vae import build_vae  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="MNIST IDX folder (default ../shared)")
    parser.add_argument("--rounds", type=int, default=16, help="one-epoch fit calls, seed 0")
    parser.add_argument("--steps", type=int, default=12, help="steps per epoch (batch 128)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated timing rounds")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    pyro.enable_validation(False)
    data = run.load(args)
    batch, k = 128, 50
    part = run.subset(data, args.steps * batch)
    torch.manual_seed(0)
    model = build_vae(run.NETWORK, data.data_shape)
    for _ in range(args.rounds):  # as the old harness trained ours: seed 0 every round
        run.fit_epoch(model, part, "iwae", k, batch, seed=0)
    state = run.copy_state(model)

    def epoch(side: str, seed: int) -> float:
        model.load_state_dict(state)
        function = run.fit_epoch if side == "ours" else run.floor_epoch
        return 1e3 * function(model, part, "iwae", k, batch, seed=seed) / args.steps

    cells = [(side, seed) for seed in (0, 1, 2) for side in ("ours", "floor")]
    times: dict[str, list[float]] = {f"{side}, seed {seed}": [] for side, seed in cells}
    for round_ in range(args.repeats):
        for side, seed in cells if round_ % 2 == 0 else reversed(cells):
            times[f"{side}, seed {seed}"].append(epoch(side, seed))
    result = {
        "trained": f"{args.rounds} one-epoch fit calls of {args.steps} steps, iwae K={k}, "
        f"batch {batch}, seed 0 each",
        "ms_per_step": {name: statistics.median(values) for name, values in times.items()},
        **run.host(),
    }
    for name, value in result["ms_per_step"].items():
        print(f"  {name:15} {value:7.1f} ms/step", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
