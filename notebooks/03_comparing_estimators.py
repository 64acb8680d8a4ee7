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
# # Comparing estimators: IWAE, STL, DReG, and a penalty that is not a bound
#
# `pyro_vae.make_elbo(name, K)` builds each estimator as a Pyro ELBO:
#
# | name | objective | gradient |
# | --- | --- | --- |
# | `mc` | ELBO, Monte Carlo KL (`Trace_ELBO`) | reparameterized |
# | `iwae` | `L_K = E log (1/K) sum_k p(x, z_k) / q(z_k\|x)` | reparameterized |
# | `stl` | ELBO | path derivative, "sticking the landing" (Roeder et al., 2017) |
# | `dreg` | `L_K` | doubly reparameterized (Tucker et al., 2019) |
# | `penalty` | `E_q[log p(x\|z)] - sum_j mu_j^2 + (sigma_j - 1)^2`, **not a bound** | reparam. |
#
# We first use the linear-Gaussian VAE of `pyro_vae.models.exact`, where `log p(x)`, the
# posterior and the ELBO are known exactly, then a VAE trained on the digits.
# `pyro_vae.bound_tightness` computes `L_1 <= L_K <= log p(x)` per data point and the
# penalty objective beside them.

# %%
import time

import matplotlib.pyplot as plt
import pyro
import torch

import pyro_vae as pv
from pyro_vae.analysis.gradients import snr_versus_particles
from pyro_vae.models.exact import LinearGaussianVAE

# small models: one thread is as fast as two here, and steady on shared cores
torch.set_num_threads(1)
started = time.perf_counter()

# %% [markdown]
# ## Exact model: the bounds in order

# %%
torch.manual_seed(0)
vae = LinearGaussianVAE.random(data_dim=5, latent_dim=2, noise_scale=1.0, seed=0)
with torch.no_grad():
    x = vae.marginal().sample((100,)).float()
pyro.set_rng_seed(0)
bounds = pv.bound_tightness(vae, x, particles=(1, 5, 50), num_samples=5000)
for k, value in zip(bounds["particles"], bounds["bound_means"]):
    print(f"L_{k:<3d} {value:9.4f}")
print(f"log p(x), importance sampled K=5000 {bounds['log_likelihood']:9.4f}")
print(f"log p(x), exact                     {bounds['exact_log_marginal']:9.4f}")
print(f"ELBO, exact                         {bounds['exact_elbo']:9.4f}")

# %% [markdown]
# ## Exact model: the penalty exceeds log p(x)
#
# The penalty replaces `KL(q || p) = sum_j -log sigma_j + (sigma_j^2 + mu_j^2 - 1) / 2`
# by `sum_j mu_j^2 + (sigma_j - 1)^2`. The KL grows without bound as sigma shrinks; the
# penalty stays below `1 + mu^2`. With sharp data (noise scale 0.1) and the guide at
# the exact posterior (so the ELBO equals log p(x)), the penalty "objective" is far
# above log p(x), which a lower bound can never be.

# %%
sharp = LinearGaussianVAE.random(5, 2, noise_scale=0.1, seed=0, orthogonal=True)
with torch.no_grad():
    sharp.set_guide_to_posterior()
    x_sharp = sharp.marginal().sample((100,)).float()
pyro.set_rng_seed(0)
sharp_bounds = pv.bound_tightness(sharp, x_sharp, particles=(1, 5), num_samples=2000)
print(f"exact log p(x)     {sharp_bounds['exact_log_marginal']:9.3f}")
print(f"exact ELBO         {sharp_bounds['exact_elbo']:9.3f}")
print(f"penalty objective  {sharp_bounds['penalty_objective']:9.3f}")
print(
    f"penalty above log p(x) for {sharp_bounds['penalty_exceeds_log_likelihood_share']:.0%} "
    f"of the points, by {sharp_bounds['penalty_minus_log_likelihood']:.2f} nats on average"
)

# %% [markdown]
# ## Exact model: gradient signal-to-noise against K
#
# Rainforth et al. (2018) showed that the IWAE encoder gradient's signal-to-noise ratio
# falls like `1/sqrt(K)`; DReG removes the score-function terms that cause it. We
# start from the exact posterior and widen the guide's scales (a guide *near* the
# posterior), then measure the SNR (mean over parameters of `|mean| / std` of 200
# gradient draws) for K = 1, 10, 100. STL's encoder gradient at the exact posterior is
# exactly zero: the path derivative of `log p(x, z) - log q(z|x)` vanishes there.

# %%
near = LinearGaussianVAE.random(5, 2, noise_scale=0.5, seed=1, orthogonal=True)
with torch.no_grad():
    near.set_guide_to_posterior()
    x_near = near.marginal().sample((50,)).float()
stl = pv.estimator_gradient_statistics(near, x_near, "stl", 1, 20)["encoder"]
print(
    f"STL at the exact posterior: encoder gradient norm {stl['mean_norm']:.2e}, "
    f"variance {stl['variance']:.2e}"
)
with torch.no_grad():
    near.encoder.raw_scale.add_(0.5)
    print(f"KL gap of the widened guide: {float(near.kl_gap(x_near).mean()):.3f} nats")
rows = snr_versus_particles(near, x_near, ("iwae", "dreg"), (1, 10, 100), num_draws=200)
for row in rows:
    print(
        f"{row['estimator']:5s} K={row['particles']:<4d} encoder SNR "
        f"{row['encoder_snr']:6.3f}   decoder SNR {row['decoder_snr']:6.3f}"
    )

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, group in zip(axes, ("encoder", "decoder")):
    for estimator in ("iwae", "dreg"):
        sub = [r for r in rows if r["estimator"] == estimator]
        ax.plot([r["particles"] for r in sub], [r[f"{group}_snr"] for r in sub], "o-")
    ax.set(xscale="log", xlabel="K", title=f"{group} gradient SNR")
axes[0].legend(["iwae", "dreg"])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## On the digits
#
# A VAE trained for 40 epochs with `mc`, and one trained the same way with `penalty`.
# For each, `bound_tightness` on 200 test images, log p(x) importance sampled with
# K = 2000.

# %%
data = pv.load_data("digits")
x_test = data.evaluation_images("test")[:200]
model_config = pv.ModelConfig(latent_dims=(8,), hidden=(128,))
trained, results = {}, {}
for estimator in ("mc", "penalty"):
    torch.manual_seed(0)
    vae = pv.build_vae(model_config, data.data_shape)
    train = pv.TrainConfig(estimator=estimator, epochs=40, batch_size=100, lr=3e-3, eval_samples=0)
    pv.fit(vae, data, train, progress=False, log=None)
    trained[estimator] = vae
    pyro.set_rng_seed(0)
    results[estimator] = r = pv.bound_tightness(
        vae, x_test, particles=(1, 5, 50, 500), num_samples=2000
    )
    bound_text = "  ".join(f"L_{k} {v:.2f}" for k, v in zip(r["particles"], r["bound_means"]))
    print(f"trained with {estimator}: {bound_text}  log p(x) {r['log_likelihood']:.2f}")
    print(
        f"    penalty objective {r['penalty_objective']:.2f}: above log p(x) by "
        f"{r['penalty_minus_log_likelihood']:.2f} nats "
        f"({r['penalty_exceeds_log_likelihood_share']:.0%} of the images)"
    )

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for estimator, r in results.items():
    ax.plot(r["particles"], r["bound_means"], "o-", label=f"L_K, trained with {estimator}")
    ax.axhline(r["log_likelihood"], ls="--", color=ax.lines[-1].get_color())
    ax.plot([1], [r["penalty_objective"]], "x", ms=10, color=ax.lines[-1].get_color())
ax.set(
    xscale="log", xlabel="K", ylabel="nats per image", title="L_K (dashed: log p(x), x: penalty)"
)
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# And the gradient SNR of IWAE and DReG at the `mc`-trained parameters (50 test images,
# 100 draws):

# %%
rows = snr_versus_particles(trained["mc"], x_test[:50], ("iwae", "dreg"), (1, 10, 30), 100)
for row in rows:
    print(
        f"{row['estimator']:5s} K={row['particles']:<3d} encoder SNR "
        f"{row['encoder_snr']:6.3f}   decoder SNR {row['decoder_snr']:6.3f}"
    )
print(f"notebook ran in {time.perf_counter() - started:.0f} s")

# %% [markdown]
# ## What we got
#
# On the exact model (noise scale 1, a random guide): `L_1` -15.81 < `L_5` -12.01 <
# `L_50` -10.12 < log p(x) -8.82 (exact; the importance-sampled estimate with K = 5000,
# -9.31, is still 0.49 nats low: with a guide this far from the posterior, importance
# sampling gives a loose lower bound). With sharp data and the guide at the posterior,
# the penalty objective (0.815) was above the exact log p(x) (-1.090) for 95% of the
# points, by 1.90 nats on average. STL's encoder gradient at the exact posterior had
# norm 1.2e-05 (zero up to float32 rounding). With the widened guide (KL gap 0.37 nats)
# IWAE's encoder SNR fell 0.443 -> 0.189 -> 0.083 at K = 1, 10, 100 while DReG's rose
# 0.773 -> 2.097 -> 7.339; both have the same decoder gradient.
#
# On the digits (200 test images): the `mc`-trained model has `L_1` -24.10 < `L_5`
# -23.88 < `L_50` -23.80 <= log p(x) -23.80. The `penalty`-trained model has log p(x)
# -29.55, while its own objective reads -23.90: 5.65 nats *above* log p(x), for 100% of
# the images. At the `mc`-trained parameters IWAE's encoder SNR fell 0.318 -> 0.142 ->
# 0.123 at K = 1, 10, 30 while DReG's stayed near 1 (1.134, 1.149, 0.935). The notebook
# ran in about 25 s on 2 cores. (Numbers as printed by the committed run.)
