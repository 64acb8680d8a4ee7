"""A plain SVI training script: copy it and adapt it.

The library's model and guide (a Pyro program), ``pyro.infer.SVI``, and first
``Trace_ELBO`` (Monte Carlo KL), then ``TraceMeanField_ELBO`` (closed-form KL) from the
same initial parameters. Each epoch prints the test ELBO and its two terms, in nats per
data point (higher is better; SVI minimises loss = -ELBO).

    python examples/train_vae.py                      # digits, built in, offline
    python examples/train_vae.py --dataset mnist --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import copy

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_vae import ModelConfig, build_vae, elbo_terms, load_data


def scaled(program, num_data: int):
    """``program`` with every log-density times ``num_data / batch``: a mini-batch's loss
    then estimates -ELBO of the whole training set (what ``pyro_vae.fit`` does; the
    programs themselves take only the batch)."""

    def run(x):
        with poutine.scale(scale=num_data / x.shape[0]):
            return program(x)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--latent-dims", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="use only this many images")
    args = parser.parse_args(argv)

    pyro.set_rng_seed(0)
    data = load_data(args.dataset, args.data_dir, binarize="dynamic", limit=args.limit)
    test_x = data.evaluation_images("test")
    initial = build_vae(ModelConfig(latent_dims=(args.latent_dims,)), data.data_shape)

    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        print(f"--- {type(elbo).__name__} ---")
        pyro.clear_param_store()  # pyro.module registers the networks' parameters here
        pyro.set_rng_seed(0)
        vae = copy.deepcopy(initial)
        num_data = len(data.train)
        model, guide = scaled(vae.model, num_data), scaled(vae.guide, num_data)
        svi = SVI(model, guide, Adam({"lr": 1e-3}), loss=elbo)
        generator = torch.Generator().manual_seed(0)
        for epoch in range(1, args.epochs + 1):
            total_loss = 0.0
            for x in data.batches(args.batch_size, generator):  # shuffled, binarized afresh
                total_loss += svi.step(x) * x.shape[0] / num_data
            train_elbo = -total_loss / num_data
            with torch.no_grad():
                terms = elbo_terms(vae, test_x, kl="analytic", num_samples=1)
            print(
                f"epoch {epoch:3d}  train ELBO {train_elbo:8.3f}  test ELBO "
                f"{terms.elbo.mean():8.3f} = E[log p(x|z)] "
                f"{terms.expected_log_likelihood.mean():8.3f} - KL {terms.kl.mean():6.3f}"
            )


if __name__ == "__main__":
    main()
