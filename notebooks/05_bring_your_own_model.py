# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Bringing your own Pyro model
#
# The tools take any object with two Pyro programs over a mini-batch, `model(x)` and
# `guide(x)` (see `pyro_vae.models.protocol`): sample sites inside a plate over the data
# points, event dimensions declared with `.to_event`, at least one observed site. Site
# names are found from the traces. Here is a VAE written the way Pyro's VAE tutorial
# writes one (its own networks, sites `latent` and `obs`, `pyro.module` calls), taken
# through `pyro_vae.fit`, `pyro_vae.evaluate`, the gradient and bound measurements, and
# the posterior diagnostics of `pyro_vae.analysis.diagnostics`.

# %%
import time

import arviz as az
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyro_vae as pv
from pyro_vae.analysis import diagnostics

# small models: one thread is as fast as two here, and steady on shared cores
torch.set_num_threads(1)
started = time.perf_counter()


class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, x_dim=64):
        super().__init__()
        self.fc1 = nn.Linear(x_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        hidden = self.softplus(self.fc1(x.reshape(-1, 64)))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, x_dim=64):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, x_dim)
        self.softplus = nn.Softplus()

    def forward(self, z):
        return torch.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class TutorialVAE(nn.Module):
    """Pyro's VAE tutorial, on 8x8 digits."""

    def __init__(self, z_dim=4, hidden_dim=64):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros((x.shape[0], self.z_dim))
            z_scale = x.new_ones((x.shape[0], self.z_dim))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            probs = self.decoder(z)
            pyro.sample(
                "obs", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=x.reshape(-1, 64)
            )

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


data = pv.load_data("digits", binarize="static")
x_test = data.evaluation_images("test")
print(pv.model_sites(TutorialVAE(), x_test[:2]))

# %% [markdown]
# ## Training with `fit`
#
# `fit` scales the mini-batch to the data set itself (no `num_data` argument needed),
# runs the programs in a private parameter store, and replays each step from a graph
# captured from the Pyro ELBO (checked against the eager ELBO when captured).

# %%
torch.manual_seed(0)
vae = TutorialVAE()
config = pv.TrainConfig(epochs=60, batch_size=100, lr=3e-3, eval_samples=0, seed=0)
history = pv.fit(vae, data, config, progress=False, log=None)
print(f"test ELBO after 60 epochs: {history['test_elbo'][-1]:.2f}")
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(history["train_elbo"], label="train (Monte Carlo)")
ax.plot(history["test_elbo"], label="test")
ax.set(xlabel="epoch", ylabel="ELBO (nats per image)", ylim=(-45, None))
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## `evaluate`: ELBO and its terms, log p(x), active units, PSIS k-hat

# %%
result = pv.evaluate(vae, x_test, num_samples=1000)
for key in (
    "test_elbo",
    "test_expected_log_likelihood",
    "test_kl",
    "test_log_likelihood",
    "test_log_likelihood_sem",
    "active_units",
):
    print(f"{key:30s} {getattr(result, key):.3f}")
print({k: v for k, v in result.to_dict().items() if k.startswith("khat")})

# %% [markdown]
# ## Gradients and bounds
#
# The encoder's gradient variance and SNR for three estimators at the trained
# parameters (100 test images, 100 draws), then `L_1 <= L_K <= log p(x)`.

# %%
for estimator in ("mc", "analytic", "stl"):
    pyro.set_rng_seed(0)
    stats = pv.estimator_gradient_statistics(vae, x_test[:100], estimator, 1, 100)
    print(
        f"{estimator:8s} encoder variance {stats['encoder']['variance']:.3g}  "
        f"SNR {stats['encoder']['snr_mean']:.3f}   decoder SNR {stats['decoder']['snr_mean']:.3f}"
    )
pyro.set_rng_seed(0)
bounds = pv.bound_tightness(vae, x_test[:100], particles=(1, 10, 100), num_samples=2000)
print(
    "  ".join(f"L_{k} {v:.2f}" for k, v in zip(bounds["particles"], bounds["bound_means"])),
    f" log p(x) {bounds['log_likelihood']:.2f}",
)

# %% [markdown]
# ## Posterior diagnostics
#
# For three test images: the reference posterior p(z | x) under the trained decoder
# by NUTS (`pyro.infer.MCMC`), as ArviZ `InferenceData`; the guide's draws for the
# same images; and the two gaps of Cremer et al. (2018), with a Gaussian q optimized
# for each image alone: **approximation gap** = log p(x) - best local ELBO (the
# Gaussian family's cost), **amortization gap** = best local ELBO - encoder's ELBO
# (the encoder's cost).

# %%
x_few = x_test[:3]
nuts = diagnostics.nuts_posterior(vae, x_few, chains=2, warmup=150, samples=150, jit=False)
guide = diagnostics.guide_draws(vae, x_few, chains=2, samples=150)
summary = diagnostics.nuts_summary(nuts)
print({k: summary[k] for k in ("rhat_max", "ess_bulk_min", "divergences")})
gaps = diagnostics.inference_gaps(vae, x_few, is_samples=2000, local_steps=300)
for name in ("log_likelihood", "optimal_local_elbo", "amortized_elbo"):
    print(f"{name:20s} {gaps[name]['mean']:8.2f}")
for name in ("approximation_gap", "amortization_gap"):
    print(f"{name:20s} {gaps[name]['mean']:8.2f}")

# %%
nuts_z = nuts.posterior["latent"].values.reshape(-1, *nuts.posterior["latent"].shape[2:])
guide_z = guide.posterior["latent"].values.reshape(-1, *guide.posterior["latent"].shape[2:])
fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
for i, ax in enumerate(axes):
    ax.scatter(nuts_z[:, i, 0], nuts_z[:, i, 1], s=4, alpha=0.5, label="NUTS p(z|x)")
    ax.scatter(guide_z[:, i, 0], guide_z[:, i, 1], s=4, alpha=0.5, label="guide q(z|x)")
    ax.set(title=f"test image {i}", xlabel="z[0]", ylabel="z[1]")
axes[0].legend(markerscale=3)
plt.tight_layout()
plt.show()
print(az.summary(nuts, kind="diagnostics").head())
print(f"notebook ran in {time.perf_counter() - started:.0f} s")

# %% [markdown]
# ## What we got
#
# The tutorial-style VAE (4 latent dimensions, 64 softplus units) trained by `fit` for 60
# epochs reached a test ELBO of -24.13 = E[log p(x|z)] -21.13 - KL 3.00 (from
# `evaluate`), with log p(x) -23.94 ± 0.22 (K = 1000), all 4 units active, and PSIS
# k-hat above 0.7 for 2.4% of the 297 test images. At the trained parameters the
# encoder-gradient variance was 8.05e4 (mc), 5.37e4 (analytic) and 5.91e3 (stl: 14 times
# smaller than mc); `L_1` -24.25 < `L_10` -24.07 <= `L_100` -24.06 <= log p(x) -24.06 on
# 100 images. On three test images NUTS (2 chains x 150 draws) had max r-hat 1.03, no
# divergences; the inference gap split into an approximation gap of 0.06 nats and an
# amortization gap of 0.20: for this small model the encoder costs more than the
# Gaussian family. The notebook ran in about 20 s on 2 cores. (Numbers as printed by the
# committed run.)
