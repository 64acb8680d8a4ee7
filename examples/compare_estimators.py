"""Compare ELBO estimators where the answer is known, then on real data.

Part 1 uses a linear-Gaussian VAE (``pyro_vae.models.exact``) with a guide near the exact
posterior: every estimator's gradient is measured against the exact ELBO gradient, and
the SNR of IWAE and DReG against K. Part 2 runs the equal-budget comparison of
``pyro-vae compare`` on the built-in digits (or MNIST with --dataset/--data-dir).

    python examples/compare_estimators.py --out runs/compare-example
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyro
import torch

from pyro_vae import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.analysis.gradients import estimator_gradient_statistics, snr_versus_particles
from pyro_vae.app.compare import compare_estimators, markdown_table
from pyro_vae.models.exact import LinearGaussianVAE


def known_answers(draws: int) -> None:
    pyro.set_rng_seed(0)
    vae = LinearGaussianVAE.random(
        data_dim=6, latent_dim=3, noise_scale=0.7, seed=1, orthogonal=True
    )
    x = vae.marginal().sample((16,)).float()
    vae.set_guide_to_posterior()
    with torch.no_grad():  # move the guide a little off the posterior
        vae.encoder.loc.bias += 0.3
        vae.encoder.raw_scale += 0.3
    print(f"posterior KL gap: {vae.kl_gap(x).mean():.3f} nats per data point")
    vae.zero_grad()
    (-vae.exact_elbo(x).sum()).backward()
    exact = {
        "encoder": torch.cat([p.grad.reshape(-1) for p in vae.encoder.parameters()]),
        "decoder": torch.cat([p.grad.reshape(-1) for p in vae.decoder.parameters()]),
    }
    print("estimator  group    variance     SNR   bias (in s.e.m., max over parameters)")
    for name in ("mc", "analytic", "stl", "penalty"):
        stats = estimator_gradient_statistics(vae, x, name, 1, draws, reference=exact)
        for group, s in stats.items():
            print(
                f"{name:10} {group:8} {s['variance']:9.3g} {s['snr_mean']:7.3f} "
                f"{s['bias_z_max']:8.1f}"
            )
    print("\nSNR against K (mean over parameters of |mean| / std):")
    for row in snr_versus_particles(vae, x, ("iwae", "dreg"), (1, 10, 100), num_draws=draws):
        print(
            f"{row['estimator']:5} K={row['particles']:<4} encoder {row['encoder_snr']:7.3f}"
            f"   decoder {row['decoder_snr']:7.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--draws", type=int, default=200, help="gradient draws")
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/compare-example"))
    args = parser.parse_args(argv)

    known_answers(args.draws)
    config = RunConfig(
        model=ModelConfig(latent_dims=(10,)),
        data=DataConfig(dataset=args.dataset, data_dir=args.data_dir, limit=args.limit),
        train=TrainConfig(epochs=args.epochs, particles=5),
    )
    result = compare_estimators(
        config,
        ["mc", "analytic", "iwae", "stl", "dreg", "penalty"],
        args.out,
        eval_samples=args.eval_samples,
        grad_draws=args.draws,
        progress=False,
    )
    print(markdown_table(result["summary"]))


if __name__ == "__main__":
    main()
