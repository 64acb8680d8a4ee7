"""How good is the guide? Reference posteriors by NUTS, inference gaps, PSIS, ArviZ.

The guide q(z|x) is an approximation twice over: a Gaussian family, and an amortized
encoder. For chosen images this module measures both (Cremer, Li & Duvenaud,
"Inference Suboptimality in Variational Autoencoders", 2018):

- ``log p(x)``: importance sampling with many samples (its proposal: the locally
  optimized Gaussian below, closer to the posterior than the encoder's);
- the amortized ELBO: the encoder's q(z|x);
- the optimal local ELBO: a Gaussian q optimized for each image alone, from the
  encoder's output (local SVI, closed-form KL);
- approximation gap = log p(x) - optimal local ELBO (the family's limit);
  amortization gap = optimal local ELBO - amortized ELBO (the encoder's limit).

The reference posterior p(z | x) under the trained decoder is sampled with NUTS
(``pyro.infer.MCMC``), several chains one after another, and returned as ArviZ
``InferenceData`` next to the guide's draws for the same images, so that ``az.summary``,
``az.ess``, ``az.rhat`` and ArviZ's plots work on both.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .checkpoint import atomic_write_json, atomic_write_text
from .errors import UserInputError
from .estimators import make_elbo, sample_sites, vectorized_traces
from .evaluation import evaluation_mode
from .model import data_plate, param_store_registration
from .networks import positive_scale


def _arviz():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing", category=FutureWarning)
        import arviz as az
    return az


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """The module's parameters as constants (no gradients) for the duration."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


# ------------------------------------------------------------------ NUTS and the guide
def nuts_posterior(
    vae,
    x: torch.Tensor,
    chains: int = 4,
    warmup: int = 300,
    samples: int = 300,
    seed: int = 0,
    image_ids: Sequence[int] | None = None,
    jit: bool = True,
    max_tree_depth: int = 8,
    progress: bool = False,
):
    """Samples of p(z | x) under the model's decoder, as ArviZ ``InferenceData``.

    Runs ``chains`` NUTS chains (Hoffman & Gelman, 2014) one after another, each from
    its own random initial point, on ``vae.model`` conditioned on ``x``; the network
    parameters are held fixed. Variables are the model's latent sites, with dims
    ``(chain, draw, image, <site>_dim)``; ``sample_stats`` holds divergences, and the
    InferenceData attributes the adapted step sizes.
    """
    from pyro.infer import MCMC, NUTS

    if chains < 1 or warmup < 1 or samples < 1:
        raise UserInputError("chains, warmup and samples must each be >= 1")
    x = vae.flatten(x)
    draws: dict[str, list[np.ndarray]] = {}
    diverging, step_size = [], []
    started = time.perf_counter()
    with (
        frozen(vae),
        evaluation_mode(vae),
        param_store_registration(False),
        pyro.validation_enabled(False),
    ):
        for chain in range(chains):
            pyro.set_rng_seed(seed + 1000 * chain)
            kernel = NUTS(
                vae.model, jit_compile=jit, ignore_jit_warnings=True, max_tree_depth=max_tree_depth
            )
            mcmc = MCMC(
                kernel,
                num_samples=samples,
                warmup_steps=warmup,
                num_chains=1,
                disable_progbar=not progress,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings of the JIT
                mcmc.run(x)
            for name, value in mcmc.get_samples().items():
                draws.setdefault(name, []).append(value.detach().cpu().numpy())
            stats = mcmc.diagnostics()
            divergent = np.zeros(samples, dtype=bool)
            divergent[list(stats.get("divergences", {}).get("chain 0", []))] = True
            diverging.append(divergent)
            step_size.append(float(kernel.step_size))
    return _inference_data(
        {name: np.stack(values) for name, values in draws.items()},
        image_ids if image_ids is not None else range(x.shape[0]),
        sample_stats={"diverging": np.stack(diverging)},
        attrs={
            "sampler": "NUTS (pyro.infer.MCMC), chains run sequentially",
            "warmup": warmup,
            "step_size": json.dumps(step_size),
            "seconds": time.perf_counter() - started,
        },
    )


def _inference_data(posterior: dict[str, np.ndarray], image_ids, **groups):
    """ArviZ InferenceData with dims ``(chain, draw, image, <site>_dim)`` per site."""
    return _arviz().from_dict(
        posterior=posterior,
        coords={"image": list(image_ids)},
        dims={name: ["image", f"{name}_dim"] for name in posterior},
        **groups,
    )


@torch.no_grad()
def guide_draws(
    vae,
    x: torch.Tensor,
    chains: int,
    samples: int,
    seed: int = 0,
    image_ids: Sequence[int] | None = None,
):
    """Independent draws from the guide q(z | x), shaped like :func:`nuts_posterior`'s."""
    x = vae.flatten(x)
    with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False), evaluation_mode(vae):
        torch.manual_seed(seed)
        _, guide_trace = vectorized_traces(vae.model, vae.guide, x, chains * samples)
    posterior = {
        site["name"]: site["value"].reshape(chains, samples, *site["value"].shape[1:]).cpu().numpy()
        for site in sample_sites(guide_trace)
    }
    return _inference_data(
        posterior,
        image_ids if image_ids is not None else range(x.shape[0]),
        attrs={"sampler": "the guide q(z|x), independent draws"},
    )


def nuts_summary(idata) -> dict[str, Any]:
    """Worst r-hat, smallest bulk and tail ESS, and divergences of a NUTS run."""
    az = _arviz()
    rhat = az.rhat(idata)
    ess_bulk = az.ess(idata, method="bulk")
    ess_tail = az.ess(idata, method="tail")
    names = list(idata.posterior.data_vars)
    chains, draws = idata.posterior.sizes["chain"], idata.posterior.sizes["draw"]
    return {
        "chains": int(chains),
        "draws_per_chain": int(draws),
        "rhat_max": float(max(float(rhat[n].max()) for n in names)),
        "rhat_share_above_1.01": float(
            np.mean(np.concatenate([rhat[n].values.ravel() > 1.01 for n in names]))
        ),
        "ess_bulk_min": float(min(float(ess_bulk[n].min()) for n in names)),
        "ess_bulk_median": float(
            np.median(np.concatenate([ess_bulk[n].values.ravel() for n in names]))
        ),
        "ess_tail_min": float(min(float(ess_tail[n].min()) for n in names)),
        "divergences": int(idata.sample_stats["diverging"].values.sum()),
        "step_size": json.loads(idata.attrs.get("step_size", "[]")),
        "seconds": float(idata.attrs.get("seconds", float("nan"))),
    }


# ------------------------------------------------------------------ local SVI
class LocalGaussianGuide(nn.Module):
    """A Gaussian q per image and latent site, free of the encoder: q_i(z) = N(m_i, s_i).

    Sites are visited in the model's order (top layer first), and are independent given
    nothing: a mean-field guide, for which the closed-form KL of TraceMeanField_ELBO is
    exact in any model.
    """

    def __init__(self, locs: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]):
        super().__init__()
        self.sites = list(locs)
        self.locs = nn.ParameterDict({n: nn.Parameter(v.detach().clone()) for n, v in locs.items()})
        raw = {n: v.detach().clamp_min(1e-3) for n, v in scales.items()}
        self.raw_scales = nn.ParameterDict(
            {
                n: nn.Parameter(v - 1e-4 + torch.log(-torch.expm1(-(v - 1e-4))))
                for n, v in raw.items()
            }
        )

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        with data_plate(x, num_data):
            for name in self.sites:
                scale = positive_scale(self.raw_scales[name])
                pyro.sample(name, dist.Normal(self.locs[name], scale).to_event(1))


class _WithGuide:
    """A model with another guide: what estimators and log_likelihood need of a VAE."""

    analytic_kl_is_exact = True

    def __init__(self, vae, guide: LocalGaussianGuide):
        self.vae, self.local = vae, guide
        self.model, self.guide = vae.model, guide.guide
        self.flatten, self.data_dim = vae.flatten, vae.data_dim
        self.latent_sites = vae.latent_sites


def optimize_local_guides(
    vae,
    x: torch.Tensor,
    steps: int = 1000,
    lr: float = 0.02,
    particles: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> _WithGuide:
    """Fit a Gaussian q per image by SVI, starting from the encoder's q(z|x).

    Maximizes each image's ELBO over (m_i, s_i) with the decoder fixed (path-derivative
    gradients with ``particles`` samples, Adam with a cosine-decaying learning rate).
    Returns an object usable as a VAE (model + local guide).
    """
    x = vae.flatten(x)
    with torch.no_grad(), pyro.validation_enabled(False), evaluation_mode(vae):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
    locs, scales = {}, {}
    model_order = [n for n in reversed(vae.latent_sites)]  # top layer first, as the model
    for site in sample_sites(guide_trace):
        normal = site["fn"]
        while isinstance(normal, torch.distributions.Independent):
            normal = normal.base_dist
        locs[site["name"]] = normal.loc.detach()
        scales[site["name"]] = normal.scale.detach().expand_as(normal.loc)
    ordered = [n for n in model_order if n in locs]
    local = LocalGaussianGuide({n: locs[n] for n in ordered}, {n: scales[n] for n in ordered})
    combined = _WithGuide(vae, local)
    # The path-derivative (STL) gradient: its variance vanishes as q approaches the
    # posterior, so the optimization settles instead of jittering around the optimum.
    elbo = make_elbo("stl", particles)
    optimizer = torch.optim.Adam(local.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 50)
    from tqdm.auto import tqdm

    with (
        frozen(vae),
        evaluation_mode(vae),
        param_store_registration(False),
        pyro.validation_enabled(False),
        torch.random.fork_rng(devices=[]),
    ):
        torch.manual_seed(seed)
        for _ in tqdm(
            range(steps), desc="local SVI", leave=False, disable=None if progress else True
        ):
            optimizer.zero_grad(set_to_none=True)
            loss = elbo.differentiable_loss(combined.model, combined.guide, x)
            loss.backward()
            optimizer.step()
            schedule.step()
    return combined


# ------------------------------------------------------------------ gaps
def _interval(values: np.ndarray) -> dict[str, float]:
    """Mean with a 95% Student-t interval over images."""
    from scipy import stats

    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return {"mean": mean, "ci95_low": mean, "ci95_high": mean}
    half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half}


def importance_summary(
    vae, x: torch.Tensor, num_samples: int, compile: bool | None = None
) -> dict[str, torch.Tensor]:
    """From K draws of the guide, per image: the ELBO (mean log-weight) with its standard
    error, the importance-sampled log p(x), and PSIS k-hat: one set of weights for all.

    The ELBO here uses ``log p(x, z) - log q(z|x)`` at each draw (Monte Carlo KL): near
    the posterior that is almost constant in z, so its estimate is far more precise than
    the closed-form-KL one, whose reconstruction term alone keeps its variance.
    """
    from .evaluation import _sizes, _weight_chunks, evaluation_mode, importance_weights, psis_khat

    x = vae.flatten(x)
    n = x.shape[0]
    chunk, _ = _sizes(vae, n, num_samples, None, n)
    with torch.no_grad(), pyro.validation_enabled(False), evaluation_mode(vae):
        weights = importance_weights(vae, n, num_samples, chunk, n, compile)
        log_w = torch.cat(list(_weight_chunks(weights, x, num_samples, chunk)))
    return {
        "elbo": log_w.mean(0),
        "elbo_se": log_w.std(0) / math.sqrt(num_samples),
        "log_likelihood": torch.logsumexp(log_w, 0) - math.log(num_samples),
        "khat": torch.as_tensor(psis_khat(log_w)),
    }


GAPS_SKIPPED = (
    "not computed for several latent layers: the local guide here is mean-field across "
    "layers while the amortized guide is structured, so the two families differ and the "
    "gaps would not be Cremer et al.'s decomposition"
)


def inference_gaps(
    vae,
    x: torch.Tensor,
    is_samples: int = 5000,
    local_steps: int = 1000,
    local_lr: float = 0.05,
    seed: int = 0,
    progress: bool = False,
    compile: bool | None = None,
) -> dict[str, Any]:
    """Approximation and amortization gaps per image (nats), with 95% intervals.

    One set of ``is_samples`` draws from each guide (the encoder's and the locally
    optimized one) gives its ELBO and an importance-sampled log p(x); log p(x) is taken
    from the local guide, the better proposal.
    """
    if len(vae.latent_sites) != 1:
        raise UserInputError(f"inference gaps are {GAPS_SKIPPED}")
    x = vae.flatten(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = importance_summary(vae, x, is_samples, compile)
        local_vae = optimize_local_guides(
            vae, x, local_steps, local_lr, seed=seed, progress=progress
        )
        local = importance_summary(local_vae, x, is_samples, compile)
    log_px = local["log_likelihood"]
    approximation = (log_px - local["elbo"]).numpy()
    amortization = (local["elbo"] - encoder["elbo"]).numpy()
    return {
        "images": int(x.shape[0]),
        "importance_samples": is_samples,
        "local_steps": local_steps,
        "per_image": {
            "log_likelihood": log_px.tolist(),
            "log_likelihood_encoder_proposal": encoder["log_likelihood"].tolist(),
            "optimal_local_elbo": local["elbo"].tolist(),
            "optimal_local_elbo_se": local["elbo_se"].tolist(),
            "amortized_elbo": encoder["elbo"].tolist(),
            "amortized_elbo_se": encoder["elbo_se"].tolist(),
            "approximation_gap": approximation.tolist(),
            "amortization_gap": amortization.tolist(),
            "khat_encoder_proposal": encoder["khat"].tolist(),
            "khat_local_proposal": local["khat"].tolist(),
        },
        "log_likelihood": _interval(log_px.numpy()),
        "amortized_elbo": _interval(encoder["elbo"].numpy()),
        "optimal_local_elbo": _interval(local["elbo"].numpy()),
        "approximation_gap": _interval(approximation),
        "amortization_gap": _interval(amortization),
        "inference_gap": _interval(approximation + amortization),
        "local_guide": local_vae,
    }


# ------------------------------------------------------------------ the command
def diagnose(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    images: int = 10,
    image_ids: Sequence[int] | None = None,
    chains: int = 4,
    warmup: int = 300,
    samples: int = 300,
    is_samples: int = 5000,
    local_steps: int = 1000,
    khat_images: int = 1000,
    khat_samples: int = 1000,
    seed: int = 0,
    jit: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    compile: bool | None = None,
) -> dict[str, Any]:
    """``pyro-vae diagnose``: NUTS reference posterior, gaps, PSIS k-hat; files in out_dir.

    Writes ``nuts.nc`` and ``guide.nc`` (ArviZ InferenceData), ``diagnostics.json``,
    ``diagnostics.md`` and ``plots/*.png``. Every measurement runs with the networks in
    eval mode.
    ``compile``: draw importance weights through captured graphs (``None``: when the
    amount of work repays the capture).
    """
    from .evaluation import (
        KHAT_MIN_SAMPLES,
        KHAT_THRESHOLD,
        khat_summary,
        log_likelihood_and_khat,
    )
    from .runs import RunLock, load_run

    if images < 1:
        raise UserInputError(f"--images must be >= 1, got {images}")
    if chains < 1:
        raise UserInputError(f"--chains must be >= 1, got {chains}")
    if min(warmup, samples, is_samples, local_steps, khat_samples, khat_images) < 1:
        raise UserInputError(
            "--warmup, --samples, --is-samples, --local-steps, --khat-images and "
            "--khat-samples must each be >= 1"
        )
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "diagnostics"
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file: pass a folder")
    if (out / "diagnostics.json").exists() and not overwrite:
        raise UserInputError(
            f"{out} holds diagnostics: pass --overwrite to replace them, or another --out"
        )
    config, vae, data, _ = load_run(run_dir)
    test = data.evaluation_images("test")
    ids = list(image_ids) if image_ids is not None else list(range(min(images, len(test))))
    bad = [i for i in ids if not 0 <= i < len(test)]
    if bad:
        raise UserInputError(
            f"image index {bad[0]} is out of range: the test set has {len(test)} images "
            f"(0 to {len(test) - 1})"
        )
    if not ids:
        raise UserInputError("no images selected")
    x = test[ids]
    started = time.perf_counter()
    if log:
        log(f"NUTS: {chains} chains x ({warmup} warmup + {samples} draws) on {len(ids)} images")
    nuts = nuts_posterior(vae, x, chains, warmup, samples, seed, ids, jit=jit, progress=progress)
    guide = guide_draws(vae, x, chains, samples, seed, ids)
    if len(vae.latent_sites) == 1:
        if log:
            log("gaps: local SVI per image, importance-sampled log p(x) ...")
        gaps = inference_gaps(
            vae, x, is_samples, local_steps=local_steps, seed=seed, progress=progress,
            compile=compile,
        )
        gaps.pop("local_guide")
    else:
        gaps = {"skipped": GAPS_SKIPPED}
    n_khat = min(khat_images, len(test))
    if log:
        log(f"PSIS k-hat on {n_khat} test images, K={khat_samples} ...")
    with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        _, khat = log_likelihood_and_khat(
            vae, test[:n_khat], khat_samples, progress=progress, compile=compile
        )
    fitted = khat_samples >= KHAT_MIN_SAMPLES and bool(np.isfinite(khat).any())
    worst = np.argsort(-np.nan_to_num(khat, nan=-np.inf))[:16] if fitted else np.array([], int)
    summary = nuts_summary(nuts)
    moments = _compare_moments(nuts, guide)
    khat_result: dict[str, Any] = {"images": n_khat, "samples": khat_samples}
    if fitted:
        finite = khat[np.isfinite(khat)]
        khat_result.update(
            {
                "mean": float(finite.mean()),
                "max": float(finite.max()),
                "share_above_0.7": float((finite > KHAT_THRESHOLD).mean()),
                "share_above_0.5": float((finite > 0.5).mean()),
                "worst": [{"image": int(i), "khat": float(khat[i])} for i in worst],
            }
        )
    else:
        khat_result["note"] = khat_summary(khat, khat_samples)["khat_note"]
    result = {
        "run_dir": str(run_dir),
        "image_ids": ids,
        "nuts": summary,
        "guide_vs_nuts": moments,
        "gaps": gaps,
        "khat": khat_result,
        "seconds": time.perf_counter() - started,
    }
    # everything is computed: now the folder, locked, with every file replaced atomically;
    # inside the run folder, the run's own lock (a `train --overwrite` moves that folder)
    inside = Path(out).resolve().is_relative_to(run_dir.resolve())
    with RunLock(run_dir if inside else out, f"pyro-vae diagnose {run_dir}"):
        Path(out).mkdir(parents=True, exist_ok=True)
        if (out / "diagnostics.json").exists() and not overwrite:
            raise UserInputError(
                f"{out} holds diagnostics: pass --overwrite to replace them, or another --out"
            )
        for name, idata in (("nuts.nc", nuts), ("guide.nc", guide)):
            _write_netcdf(idata, out / name)
        atomic_write_json(result, out / "diagnostics.json")
        plots = _plots(out, vae, nuts, guide, gaps, khat, test, worst, ids)
        _markdown(out / "diagnostics.md", result, plots)
    return result


def _write_netcdf(idata, path: Path) -> None:
    """ArviZ's netCDF file, written beside ``path`` and renamed over it (atomic)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        idata.to_netcdf(str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _compare_moments(nuts, guide, informed_sd: float = 0.5) -> dict[str, float]:
    """How far the guide's means and standard deviations are from NUTS's (in NUTS sds),
    over all coordinates and over the informed ones (NUTS posterior sd below
    ``informed_sd``: the prior's is 1, and uninformed units match it trivially)."""
    result = {}
    for name in nuts.posterior.data_vars:
        n = nuts.posterior[name].values.reshape(-1, *nuts.posterior[name].shape[2:])
        g = guide.posterior[name].values.reshape(-1, *guide.posterior[name].shape[2:])
        sd = n.std(0) + 1e-12
        mean_gap, sd_ratio = np.abs(n.mean(0) - g.mean(0)) / sd, g.std(0) / sd
        informed = sd < informed_sd
        result[f"{name}_mean_difference_in_sd_median"] = float(np.median(mean_gap))
        result[f"{name}_sd_ratio_guide_over_nuts_median"] = float(np.median(sd_ratio))
        result[f"{name}_informed_coordinates"] = int(informed.sum())
        if informed.any():
            result[f"{name}_informed_mean_difference_in_sd_median"] = float(
                np.median(mean_gap[informed])
            )
            result[f"{name}_informed_sd_ratio_guide_over_nuts_median"] = float(
                np.median(sd_ratio[informed])
            )
    return result


def _plots(out, vae, nuts, guide, gaps, khat, test, worst, ids) -> list[Path]:
    from .plots import _grid, _pyplot, _save

    plt = _pyplot()
    az = _arviz()
    folder = out / "plots"
    paths = []
    site = list(nuts.posterior.data_vars)[-1]
    dim_name = f"{site}_dim"
    # the most informative dimensions: smallest posterior spread (inactive units sit at
    # the prior, where guide and posterior agree trivially)
    spread = nuts.posterior[site].std(("chain", "draw")).mean("image").values
    dims = [int(d) for d in np.argsort(spread)[:3]]
    shown = ids[: min(3, len(ids))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selection = {"image": shown, dim_name: dims}
        axes = az.plot_density(
            [nuts.sel(**selection), guide.sel(**selection)],
            data_labels=["NUTS p(z|x)", "guide q(z|x)"],
            var_names=[site],
            shade=0.1,
            grid=(len(shown), len(dims)),
            figsize=(3.2 * len(dims), 2.6 * len(shown)),
        )
    for ax in np.asarray(axes).ravel():  # ArviZ titles a panel "z\n0, 18": say what it is
        name, _, coords = ax.get_title().partition("\n")
        if coords:
            image, _, dim = coords.partition(", ")
            ax.set_title(f"test image #{image}, {name} dimension {dim}", fontsize=9)
    fig = np.asarray(axes).ravel()[0].get_figure()
    fig.suptitle(
        f"posterior marginals of {site}: NUTS against the guide (the 3 most informative dims)",
        fontsize=10,
    )
    paths.append(_save(fig, folder / "marginals_nuts_vs_guide.png"))

    finite = khat[np.isfinite(khat)]
    if len(worst) == 0:  # too few importance samples for any Pareto fit: nothing to plot
        return paths + _gap_plots(plt, folder, gaps, ids)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.hist(finite, bins=40, color="C0")
    for threshold, style in ((0.5, ":"), (0.7, "--")):
        ax.axvline(threshold, color="k", ls=style, label=f"k = {threshold}")
    ax.set_xlabel("PSIS k-hat of the importance weights (encoder as proposal)")
    ax.set_ylabel("test images")
    ax.set_title(
        f"k-hat: {np.mean(finite > 0.7):.0%} of {len(finite)} images above 0.7", fontsize=10
    )
    ax.legend(fontsize=8)
    paths.append(_save(fig, folder / "khat.png"))

    fig, ax = plt.subplots(figsize=(8, 1.3))
    shape = vae.data_shape if len(vae.data_shape) == 3 else (1, 1, vae.data_dim)
    images = test[torch.as_tensor(worst)].reshape(-1, *shape)
    ax.imshow(_grid(images, len(worst)), cmap="gray", interpolation="nearest")
    ax.set_title(
        "highest k-hat: "
        + ", ".join(f"#{i} {khat[i]:.2f}" for i in worst[:8])
        + (" ..." if len(worst) > 8 else ""),
        fontsize=8,
    )
    ax.axis("off")
    paths.append(_save(fig, folder / "worst_khat_images.png"))
    return paths + _gap_plots(plt, folder, gaps, ids)


def _gap_plots(plt, folder: Path, gaps: dict[str, Any], ids) -> list[Path]:
    from .plots import _save

    if "skipped" in gaps:
        return []
    paths = []
    per = gaps["per_image"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ids) + 2), 4))
    positions = np.arange(len(ids))
    ax.bar(positions, per["approximation_gap"], label="approximation gap", color="C1")
    ax.bar(
        positions,
        per["amortization_gap"],
        bottom=per["approximation_gap"],
        label="amortization gap",
        color="C2",
    )
    ax.set_xticks(positions, [str(i) for i in ids], fontsize=8)
    ax.set_xlabel("test image")
    ax.set_ylabel("nats")
    a, m = gaps["approximation_gap"], gaps["amortization_gap"]
    ax.set_title(
        f"log p(x) - amortized ELBO =\napproximation gap {a['mean']:.2f} "
        f"[{a['ci95_low']:.2f}, {a['ci95_high']:.2f}] + amortization gap {m['mean']:.2f} "
        f"[{m['ci95_low']:.2f}, {m['ci95_high']:.2f}]",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    paths.append(_save(fig, folder / "gaps.png"))
    return paths


def _markdown(path: Path, result: dict[str, Any], plots: list[Path]) -> None:
    gaps, nuts, khat = result["gaps"], result["nuts"], result["khat"]

    def row(name, key):
        v = gaps[key]
        return f"| {name} | {v['mean']:.3f} | [{v['ci95_low']:.3f}, {v['ci95_high']:.3f}] |"

    if "skipped" in gaps:
        gap_lines = [f"Gaps {gaps['skipped']}."]
    else:
        gap_lines = [
            "| quantity | mean | 95% interval |",
            "| --- | --- | --- |",
            row(
                f"log p(x) (importance sampled, K={gaps['importance_samples']})",
                "log_likelihood",
            ),
            row("optimal local ELBO (Gaussian q per image)", "optimal_local_elbo"),
            row("amortized ELBO (the encoder)", "amortized_elbo"),
            row("approximation gap = log p(x) - local ELBO", "approximation_gap"),
            row("amortization gap = local ELBO - amortized ELBO", "amortization_gap"),
        ]
    lines = [
        "# Posterior diagnostics",
        "",
        f"Run: `{result['run_dir']}`; test images {result['image_ids']}. Nats per image.",
        "",
        "## Inference gaps (Cremer et al., 2018)",
        "",
        *gap_lines,
        "",
        "## NUTS reference posterior",
        "",
        f"{nuts['chains']} chains x {nuts['draws_per_chain']} draws; max r-hat "
        f"{nuts['rhat_max']:.3f} ({nuts['rhat_share_above_1.01']:.1%} of coordinates above "
        f"1.01); bulk ESS min {nuts['ess_bulk_min']:.0f}, median {nuts['ess_bulk_median']:.0f}; "
        f"tail ESS min {nuts['ess_tail_min']:.0f}; {nuts['divergences']} divergences.",
        "",
        "Guide against NUTS (medians over coordinates; 'informed': NUTS posterior sd "
        "below 0.5): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["guide_vs_nuts"].items())
        + ".",
        "",
        "## PSIS k-hat",
        "",
        (
            f"{khat['images']} test images, K={khat['samples']}: mean {khat['mean']:.2f}, max "
            f"{khat['max']:.2f}; {khat['share_above_0.7']:.1%} above 0.7 (importance sampling "
            f"unreliable there), {khat['share_above_0.5']:.1%} above 0.5."
            if "mean" in khat
            else f"{khat['images']} test images, K={khat['samples']}: {khat['note']}."
        ),
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{p.stem}](plots/{p.name})\n" for p in plots]
    atomic_write_text("\n".join(lines), path)
