"""Encoder- and decoder-gradient variance of the estimators on the exact linear-Gaussian
model (the table in docs/guide/estimators.md, "The field's baselines").

    python benchmarks/baseline_variance.py [DRAWS]      # default 2000 draws per row

Each row: DRAWS steps of one estimator at the model's initial parameters (seed 1, one
torch thread), the sum over the encoder's (decoder's) coordinates of the gradient's
variance, a 95% bootstrap interval of the encoder's, and the encoder's mean |mean| / sd.
"""

from __future__ import annotations

import sys

import pyro
import torch

from pyro_vae import make_elbo
from pyro_vae.models.exact import LinearGaussianVAE

ROWS = [
    ("mc", {}),
    ("stl", {}),
    ("score", {}),
    ("score", {"baseline": "leave-one-out"}),
    ("tracegraph", {}),
    ("tracegraph", {"baseline": "learned", "baseline_lr": 0.01}),
    ("iwae", {}),
    ("dreg", {}),
    ("vimco", {}),
    ("rws", {}),
]
#: estimators that need several particles to be themselves (or, with one, equal another)
SEVERAL = ("iwae", "dreg", "vimco", "rws")


def draws(model, x, name: str, num_particles: int, repeats: int, **options) -> torch.Tensor:
    """``repeats`` gradients of every parameter, one estimator and param store for all."""
    elbo = make_elbo(name, num_particles, options=options)
    pyro.set_rng_seed(1)
    out = []
    with pyro.get_param_store().scope():
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            elbo.loss_and_grads(model.model, model.guide, x)
            out.append(
                torch.cat(
                    [
                        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                        for p in model.parameters()
                    ]
                ).double()
            )
    return torch.stack(out)


def main(argv: list[str]) -> int:
    repeats = int(argv[0]) if argv else 2000
    torch.set_num_threads(1)
    model = LinearGaussianVAE.random(data_dim=4, latent_dim=2, noise_scale=0.8, seed=3)
    torch.manual_seed(0)
    x = model.marginal().sample((6,)).float()
    encoder = sum(p.numel() for p in model.encoder.parameters())
    print("| estimator | K | encoder variance | 95% interval | decoder variance | encoder SNR |")
    print("| --- | --- | --- | --- | --- | --- |")
    for num_particles in (1, 5):
        for name, options in ROWS:
            one_draw = name in SEVERAL or options.get("baseline") == "leave-one-out"
            if num_particles == 1 and one_draw:
                continue
            grads = draws(model, x, name, num_particles, repeats, **options)
            enc, dec = grads[:, :encoder], grads[:, encoder:]
            generator = torch.Generator().manual_seed(0)
            boots = torch.stack(
                [
                    enc[torch.randint(repeats, (repeats,), generator=generator)].var(0).sum()
                    for _ in range(200)
                ]
            )
            low, high = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=boots.dtype))
            snr = (enc.mean(0).abs() / enc.std(0)).mean()
            label = name + (
                f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""
            )
            print(
                f"| {label} | {num_particles} | {enc.var(0).sum():.4g} | [{low:.4g}, {high:.4g}] "
                f"| {dec.var(0).sum():.4g} | {snr:.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
