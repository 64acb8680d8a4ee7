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
# # Monte Carlo against closed-form KL
#
# Pyro offers two ELBOs for the same model and guide:
#
# - `Trace_ELBO` estimates the whole ELBO from samples, the KL included:
#   `KL ~ log q(z|x) - log p(z)` at the sampled z (**Monte Carlo KL**);
# - `TraceMeanField_ELBO` replaces that term by `KL(q(z|x) || p(z))` in closed form
#   when both are Gaussians (**closed-form KL**); for a diagonal Gaussian per dimension
#   `KL(N(mq, sq^2) || N(mp, sp^2)) = log(sp/sq) + (sq^2 + (mq - mp)^2) / (2 sp^2) - 1/2`.
#
# Both have the same expectation. They differ in the variance of their gradients,
# which is what this notebook measures with `pyro_vae.estimator_gradient_statistics`
# (`"mc"` is `Trace_ELBO`, `"analytic"` the closed-form KL), first on a linear-Gaussian
# VAE whose answers are known exactly, then on the digits.

# %%
import time

import matplotlib.pyplot as plt
import pyro
import torch

import pyro_vae as pv
from pyro_vae.models.exact import LinearGaussianVAE

# small models: one thread is as fast as two here, and steady on shared cores
torch.set_num_threads(1)
started = time.perf_counter()


def variance_ratio(vae, x, draws=400, particles=1):
    """analytic / mc total gradient variance, per parameter group."""
    stats = {}
    for estimator in ("mc", "analytic"):
        pyro.set_rng_seed(0)
        stats[estimator] = pv.estimator_gradient_statistics(vae, x, estimator, particles, draws)
    return {
        group: stats["analytic"][group]["variance"] / stats["mc"][group]["variance"]
        for group in ("encoder", "decoder")
    }


# %% [markdown]
# ## The same closed form, checked
#
# `pyro_vae.gaussian_kl` is the formula above; it agrees with
# `torch.distributions.kl_divergence`.

# %%
mq, sq, mp, sp = torch.tensor(0.3), torch.tensor(0.5), torch.tensor(-1.0), torch.tensor(2.0)
ours = pv.gaussian_kl(mq, sq, mp, sp)
torchs = torch.distributions.kl_divergence(
    torch.distributions.Normal(mq, sq), torch.distributions.Normal(mp, sp)
)
print(f"gaussian_kl {float(ours):.6f}   torch {float(torchs):.6f}")

# %% [markdown]
# ## Gradient variance on the exact linear-Gaussian VAE
#
# `z ~ N(0, I_2)`, `x | z ~ N(W z + b, s^2 I_5)`, a linear Gaussian encoder. Three
# settings: weakly informative data (noise scale s = 2, the posterior close to the
# prior), sharp data (s = 0.1) with a random guide, and sharp data with the guide set to
# the exact posterior. 400 independent gradient draws each, one particle, 100 points.

# %%
settings = {}
vae = LinearGaussianVAE.random(data_dim=5, latent_dim=2, noise_scale=2.0, seed=3)
settings["s = 2, random guide"] = vae
vae = LinearGaussianVAE.random(data_dim=5, latent_dim=2, noise_scale=0.1, seed=3)
settings["s = 0.1, random guide"] = vae
vae = LinearGaussianVAE.random(data_dim=5, latent_dim=2, noise_scale=0.1, seed=3, orthogonal=True)
with torch.no_grad():
    vae.set_guide_to_posterior()
settings["s = 0.1, guide = posterior"] = vae

ratios = {}
torch.manual_seed(0)
for label, vae in settings.items():
    x = vae.marginal().sample((100,)).float()
    ratios[label] = variance_ratio(vae, x)
    print(
        f"{label:28s} encoder variance analytic/mc {ratios[label]['encoder']:.3f}   "
        f"decoder {ratios[label]['decoder']:.3f}"
    )

# %% [markdown]
# The decoder's gradient does not involve the KL term, so its ratio is exactly 1: the
# same noise gives the same decoder gradient. For the encoder, the closed form removes
# the KL's sampling noise, which helps most when the guide stays near the prior (weak
# data). Near a sharp posterior the Monte Carlo KL term is correlated with the
# reconstruction term and partly cancels its noise (a built-in control variate), so
# the advantage can vanish or turn around.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
labels = list(ratios)
ax.barh(labels, [ratios[label]["encoder"] for label in labels])
ax.axvline(1.0, color="k", lw=0.8)
ax.set(xlabel="encoder gradient variance, analytic / mc", title="below 1: closed form wins")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## On the digits: training with each, from the same initial parameters
#
# `pyro_vae.fit` trains the same initial VAE with `estimator="mc"` and
# `estimator="analytic"`, same data order, same number of steps.

# %%
data = pv.load_data("digits")
x_test = data.evaluation_images("test")
config = pv.ModelConfig(latent_dims=(8,), hidden=(128,))
torch.manual_seed(0)
initial = pv.build_vae(config, data.data_shape)
histories, trained = {}, {}
for estimator in ("mc", "analytic"):
    vae = pv.build_vae(config, data.data_shape)
    vae.load_state_dict(initial.state_dict())
    train = pv.TrainConfig(
        estimator=estimator, epochs=40, batch_size=100, lr=3e-3, eval_samples=0, seed=0
    )
    histories[estimator] = pv.fit(vae, data, train, progress=False, log=None)
    trained[estimator] = vae
    h = histories[estimator]
    print(f"{estimator:8s} test ELBO after 40 epochs {h['test_elbo'][-1]:.2f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for estimator, h in histories.items():
    ax.plot(range(1, len(h) + 1), h["test_elbo"], label=estimator)
ax.set(xlabel="epoch", ylabel="test ELBO (nats per image)", ylim=(-40, None))
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# And the gradient variance of each estimator at the trained parameters (100 test
# images, 200 draws):

# %%
digits_ratio = variance_ratio(trained["mc"], x_test[:100], draws=200)
print(
    f"digits, at the mc-trained parameters: encoder variance analytic/mc "
    f"{digits_ratio['encoder']:.3f}, decoder {digits_ratio['decoder']:.3f}"
)
print(f"notebook ran in {time.perf_counter() - started:.0f} s")

# %% [markdown]
# ## When each wins
#
# - The closed form needs `KL(q || p)` in closed form for every latent site, *and* the
#   guide must sample each site after its parents in the model (see the hierarchical
#   notebook: for a bottom-up guide `TraceMeanField_ELBO` is biased and the library
#   refuses `analytic`). The Monte Carlo KL works for any model and guide.
# - Where it applies, the closed form lowers the encoder's gradient variance most when
#   the guide is close to the prior (weakly informative data, or early in training);
#   close to a sharp posterior the Monte Carlo KL can be as good or better.
# - The cost per step is about the same: the benchmark on the docs' Performance page
#   measured 7.6 ms (mc) and 8.9 ms (analytic) per MNIST step at batch 128.
#
# ## What we got
#
# With these seeds, the encoder-gradient variance of the closed-form KL was **0.219**
# of the Monte Carlo KL's for weakly informative data (noise scale 2), **0.995** for
# sharp data (noise scale 0.1) with a random guide, and **0.986** with the guide at the
# sharp posterior; the decoder ratio was exactly 1.000 in every case. On the digits,
# after 40 epochs from the same initial parameters, the test ELBO was -23.85 (mc) and
# -23.82 (analytic): no difference worth the name; at the mc-trained parameters the
# closed form's encoder-gradient variance was 0.514 of mc's. The notebook ran in about
# 15 s on 2 cores. (Numbers as printed by the committed run.)
