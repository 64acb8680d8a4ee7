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
# # Hierarchical latents
#
# With two stochastic layers the model is `z2 ~ N(0, I)`, `z1 | z2 ~ N(mu_1(z2),
# sigma_1(z2))`, `x | z1 ~ Bernoulli(decoder(z1))`. The guide can visit the layers in
# two orders:
#
# - **bottom-up** (Burda et al., 2016): `q(z1 | x) q(z2 | z1)`: z1 first, although z1's
#   parent in the model is z2;
# - **top-down** (Sønderby et al., 2016, the ladder VAE): a deterministic pass up gives
#   one Gaussian message per layer, then sampling runs from the top, combining each
#   message with the model's own `p(z_l | z_{l+1})` by precision weighting. Guide and
#   model visit the layers in the same order.
#
# This notebook shows why the closed-form KL (`TraceMeanField_ELBO`) is refused for the
# bottom-up guide, then trains both guides on the digits, with and without KL warm-up
# and free bits, and reads the KL of each layer.

# %%
import time

import matplotlib.pyplot as plt
import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import pyro_vae as pv
from pyro_vae.models.exact import TwoLayerLinearGaussianVAE

# small models: one thread is as fast as two here, and steady on shared cores
torch.set_num_threads(1)
started = time.perf_counter()
pyro.set_rng_seed(0)

# %% [markdown]
# ## The closed-form KL is biased for the bottom-up guide
#
# `TraceMeanField_ELBO` replaces `log q(z1|x) - log p(z1|z2)` by
# `KL(q(z1|x) || p(z1|z2))`. That KL needs a z2 to condition on, but with the bottom-up
# guide z2 is drawn *after* z1 and from it, so the "closed form" averages over the wrong
# thing. On the exact two-layer linear-Gaussian model (the exact ELBO is known) we
# estimate the ELBO 200 times with each estimator, 100 particles each, and compare.


# %%
def elbo_estimates(elbo, vae, x, repeats=200):
    pyro.set_rng_seed(0)
    with torch.no_grad():
        values = [-elbo.loss(vae.model, vae.guide, x) / len(x) for _ in range(repeats)]
    values = torch.tensor(values, dtype=torch.float64)
    return float(values.mean()), float(values.std() / len(values) ** 0.5)


for order in ("bottom-up", "top-down"):
    vae = TwoLayerLinearGaussianVAE.random(5, (2, 2), guide_order=order, seed=0)
    x = vae.marginal().sample((50,)).float()
    with torch.no_grad():
        exact = float(vae.exact_elbo(x).mean())
    print(f"{order}: exact ELBO {exact:.4f}")
    for elbo in (
        Trace_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=1),
        TraceMeanField_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=1),
    ):
        mean, se = elbo_estimates(elbo, vae, x)
        print(
            f"   {type(elbo).__name__:20s} {mean:.4f} +- {se:.4f}  "
            f"({(mean - exact) / se:+.1f} standard errors from exact)"
        )

# %% [markdown]
# So the library refuses the combination before training, with the reason:

# %%
data = pv.load_data("digits")
bottom_up = pv.build_vae(pv.ModelConfig(latent_dims=(20, 10), guide="bottom-up"), data.data_shape)
try:
    pv.fit(bottom_up, data, pv.TrainConfig(estimator="analytic", epochs=1), log=None)
except Exception as error:  # pyro_vae.errors.UserInputError: the CLI's exit status 2
    print(type(error).__name__, ":", error)

# %% [markdown]
# ## Training both guides on the digits
#
# Latent layers of 20 and 10 dimensions, the `mc` estimator, 60 epochs each from the
# same seed. The third run adds KL **warm-up** (the KL's factor rises linearly from 0 to
# 1 over the first 20 epochs) and **free bits** (each layer's batch-mean KL below 0.5
# nats gets no gradient, Kingma et al., 2016). `fit` records the test KL of each layer
# after every epoch (`test_kl_z1`, `test_kl_z2`).

# %%
runs = {
    "bottom-up": (dict(guide="bottom-up"), dict()),
    "top-down": (dict(guide="top-down"), dict()),
    "top-down, warm-up + free bits": (
        dict(guide="top-down"),
        dict(kl_warmup_epochs=20, free_bits=0.5),
    ),
}
histories = {}
for label, (model_options, train_options) in runs.items():
    torch.manual_seed(0)
    vae = pv.build_vae(pv.ModelConfig(latent_dims=(20, 10), **model_options), data.data_shape)
    config = pv.TrainConfig(
        epochs=60, batch_size=100, lr=3e-3, eval_samples=0, seed=0, **train_options
    )
    h = pv.fit(vae, data, config, progress=False, log=None)
    histories[label] = h
    log_px = pv.log_likelihood(vae, data.evaluation_images("test"), num_samples=500)
    print(
        f"{label:30s} test ELBO {h['test_elbo'][-1]:7.2f}  log p(x) K=500 "
        f"{float(log_px.mean()):7.2f}  KL z1 {h['test_kl_z1'][-1]:5.2f}  "
        f"KL z2 {h['test_kl_z2'][-1]:5.2f}"
    )

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
for ax, (label, h) in zip(axes, histories.items()):
    epochs = range(1, len(h) + 1)
    ax.plot(epochs, h["test_kl_z1"], label="KL z1")
    ax.plot(epochs, h["test_kl_z2"], label="KL z2")
    ax.set(title=label, xlabel="epoch")
axes[0].set_ylabel("test KL per layer (nats)")
axes[0].legend()
plt.tight_layout()
plt.show()

# %%
print(f"notebook ran in {time.perf_counter() - started:.0f} s")

# %% [markdown]
# ## Reading the numbers
#
# A layer whose KL stays near zero carries no information about x: the guide puts it at
# its prior and the model does not use it (posterior collapse of that layer). Warm-up
# lets the reconstruction term shape the code before the KL pulls each layer to its
# prior; free bits stop pushing a layer's KL down below a floor. With 20 + 10 latent
# dimensions, 1500 training images and 60 epochs, this is a small-scale look; the
# Hierarchical models page of the docs has the 200-epoch digits table and the MNIST
# one, with their commands.
#
# ## What we got
#
# On the exact two-layer model with the bottom-up guide, `TraceMeanField_ELBO` read
# -17.607 ± 0.004 against an exact ELBO of -17.433: biased, 47 standard errors away,
# while `Trace_ELBO` read -17.432 (0.2 standard errors). With the top-down guide both
# agreed with the exact -19.096 (within 1 standard error); Pyro itself warned that the
# bottom-up guide breaks the mean-field order.
#
# On the digits after 60 epochs: the bottom-up guide reached a test ELBO of -24.15
# (log p(x) -23.43 with K = 500) with KL z1 3.48 and KL z2 0.00: z2 unused. The top-down
# guide without warm-up collapsed completely: KL z1 0.00, KL z2 0.02, ELBO -27.07 (the
# model is then a factorized Bernoulli). With 20 epochs of warm-up and 0.5 free nats
# the top-down model kept both layers in use (KL z1 3.29, KL z2 0.68) and had the best
# bound of the three: ELBO -23.87, log p(x) -23.03. The notebook ran in about 45 s on
# 2 cores. (Numbers as printed by the committed run.)
