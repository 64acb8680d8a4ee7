"""Two stochastic layers, both inference orders, against one layer.

Trains a one-layer VAE and a two-layer VAE with the bottom-up (IWAE paper) and the
top-down (ladder) guide on the same data, then prints test ELBO, importance-sampled
log p(x), and KL and active units per layer. Analytic KL is used where it is exact
(one layer, top-down); the bottom-up guide trains with Monte Carlo KL.

    python examples/hierarchical_vae.py                     # digits
    python examples/hierarchical_vae.py --dataset mnist --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse

import torch

from pyro_vae import ModelConfig, TrainConfig, build_vae, load_data
from pyro_vae.analysis.evaluation import evaluate
from pyro_vae.training.fit import fit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--latent-dims", default="16,8", help="z1,z2 sizes")
    parser.add_argument("--eval-samples", type=int, default=1000)
    args = parser.parse_args(argv)

    data = load_data(args.dataset, args.data_dir, limit=args.limit)
    z1, z2 = (int(d) for d in args.latent_dims.split(","))
    variants = [
        ("1 layer", ModelConfig(latent_dims=(z2,)), "analytic"),
        ("2 layers, bottom-up", ModelConfig(latent_dims=(z1, z2), guide="bottom-up"), "mc"),
        ("2 layers, top-down", ModelConfig(latent_dims=(z1, z2), guide="top-down"), "analytic"),
    ]
    test = data.evaluation_images("test")
    print(f"{'model':22} {'test ELBO':>10} {'log p(x)':>10}  KL and active units per layer")
    for name, model_config, estimator in variants:
        torch.manual_seed(0)
        vae = build_vae(model_config, data.data_shape)
        config = TrainConfig(estimator=estimator, epochs=args.epochs, kl_warmup_epochs=5)
        fit(vae, data, config, progress=False, log=None)
        result = evaluate(vae, test, args.eval_samples)
        layers = ", ".join(
            f"{site}: KL {result.test_kl_by_site.get(site, result.test_kl):.2f}, {units} active"
            for site, units in result.active_units_by_site.items()
        )
        print(f"{name:22} {result.test_elbo:10.3f} {result.test_log_likelihood:10.3f}  {layers}")


if __name__ == "__main__":
    main()
