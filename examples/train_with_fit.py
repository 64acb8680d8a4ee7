"""The same comparison through ``pyro_vae.fit``: checkpoints, progress, metrics, history.

python examples/train_with_fit.py --out runs/example
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from pyro_vae import ModelConfig, TrainConfig, build_vae, load_data
from pyro_vae.training.fit import fit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--latent-dims", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="checkpoints and metrics here")
    args = parser.parse_args(argv)

    data = load_data(args.dataset, args.data_dir, limit=args.limit)
    initial = build_vae(ModelConfig(latent_dims=(args.latent_dims,)), data.data_shape)
    for estimator in ("mc", "analytic"):  # Trace_ELBO, then TraceMeanField_ELBO
        print(f"--- {estimator} ---")
        vae = copy.deepcopy(initial)
        config = TrainConfig(estimator=estimator, epochs=args.epochs, seed=0)
        run_dir = args.out / estimator if args.out else None
        history = fit(vae, data, config, run_dir=run_dir, progress=False)
        best = max(history["test_elbo"])
        print(f"{estimator}: best test ELBO {best:.3f} nats, {sum(history['seconds']):.1f} s")


if __name__ == "__main__":
    main()
