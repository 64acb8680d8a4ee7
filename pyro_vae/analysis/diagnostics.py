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
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_vae.analysis.comparison import t_quantile
from pyro_vae.analysis.draws import compare_moments as _compare_moments
from pyro_vae.analysis.draws import inference_data as _inference_data
from pyro_vae.analysis.draws import load_arviz as _arviz  # noqa: F401 (app and tests read it here)
from pyro_vae.analysis.draws import nuts_summary as nuts_summary
from pyro_vae.analysis.evaluation import evaluation_mode
from pyro_vae.analysis.khat import importance_summary as importance_summary
from pyro_vae.analysis.khat import khat_of_images as khat_of_images
from pyro_vae.analysis.khat import khat_report as khat_report
from pyro_vae.errors import UserInputError
from pyro_vae.models.networks import positive_scale
from pyro_vae.models.protocol import (
    ModelSites,
    PyroModel,
    as_batch,
    forked_rng,
    latent_sites,
    model_sites,
    parameters_of,
)
from pyro_vae.models.vae import param_store_registration
from pyro_vae.objectives.registry import make_elbo
from pyro_vae.objectives.traces import sample_sites, vectorized_traces


@contextlib.contextmanager
def frozen(owner: Any) -> Iterator[None]:
    """The parameters of ``owner``'s networks as constants (no gradients) for the duration."""
    params = parameters_of(owner)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# ------------------------------------------------------------------ NUTS and the guide
def nuts_posterior(
    vae: PyroModel,
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
    x = as_batch(vae, x)
    model_sites(vae, x)  # the protocol's checks, as every tool makes them
    draws: dict[str, list[np.ndarray]] = {}
    diverging, step_size = [], []
    started = time.perf_counter()
    with (
        frozen(vae),
        evaluation_mode(vae),
        param_store_registration(vae, False),
        pyro.validation_enabled(False),
        forked_rng(),
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


@torch.no_grad()
def guide_draws(
    vae: PyroModel,
    x: torch.Tensor,
    chains: int,
    samples: int,
    seed: int = 0,
    image_ids: Sequence[int] | None = None,
):
    """Independent draws from the guide q(z | x), shaped like :func:`nuts_posterior`'s."""
    x = as_batch(vae, x)
    with forked_rng(), pyro.validation_enabled(False), evaluation_mode(vae):
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

    #: the name of the model's plate over data points (the guide's must match it)
    plate = "data"

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate(self.plate, x.shape[0], dim=-1):
            for name in self.sites:
                scale = positive_scale(self.raw_scales[name])
                pyro.sample(name, dist.Normal(self.locs[name], scale).to_event(1))


class _WithGuide:
    """A model with another guide: what estimators and log_likelihood need of a VAE."""

    analytic_kl_is_exact = True

    def __init__(self, vae: PyroModel, guide: LocalGaussianGuide, sites: ModelSites):
        self.vae, self.local = vae, guide
        self.model, self.guide = vae.model, guide.guide
        self.latent_sites = sites.latent
        self.model_sites = sites
        flatten = getattr(vae, "flatten", None)
        if callable(flatten):
            self.flatten = flatten


def optimize_local_guides(
    vae: PyroModel,
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
    x = as_batch(vae, x)
    sites = model_sites(vae, x)
    with torch.no_grad(), pyro.validation_enabled(False), evaluation_mode(vae):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(x)
    locs, scales = {}, {}
    # the sites in the model's order (for layers, the top layer first)
    model_order = [s["name"] for s in sample_sites(model_trace) if s["name"] in sites.latent]
    for site in sample_sites(guide_trace):
        normal = site["fn"]
        while isinstance(normal, torch.distributions.Independent):
            normal = normal.base_dist
        locs[site["name"]] = normal.loc.detach()
        scales[site["name"]] = normal.scale.detach().expand_as(normal.loc)
    ordered = [n for n in model_order if n in locs]
    local = LocalGaussianGuide({n: locs[n] for n in ordered}, {n: scales[n] for n in ordered})
    local.plate = sites.data_plate
    combined = _WithGuide(vae, local, sites)
    # The path-derivative (STL) gradient: its variance vanishes as q approaches the
    # posterior, so the optimization settles instead of jittering around the optimum.
    elbo = make_elbo("stl", particles)
    optimizer = torch.optim.Adam(local.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 50)
    from tqdm.auto import tqdm

    with (
        frozen(vae),
        evaluation_mode(vae),
        param_store_registration(vae, False),
        pyro.validation_enabled(False),
        forked_rng(),
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
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return {"mean": mean, "ci95_low": mean, "ci95_high": mean}
    half = float(t_quantile(0.95, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half}


GAPS_SKIPPED = (
    "not computed for several latent layers: the local guide here is mean-field across "
    "layers while the amortized guide is structured, so the two families differ and the "
    "gaps would not be Cremer et al.'s decomposition"
)


def inference_gaps(
    vae: PyroModel,
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
    x = as_batch(vae, x)
    if len(latent_sites(vae, x)) != 1:
        raise UserInputError(f"inference gaps are {GAPS_SKIPPED}")
    with forked_rng():
        torch.manual_seed(seed)
        encoder = importance_summary(vae, x, is_samples, compile)
        local_vae = optimize_local_guides(
            vae, x, local_steps, local_lr, seed=seed, progress=progress
        )
        local = importance_summary(local_vae, x, is_samples, compile)
    # the per-image numbers leave the device here: everything after is reporting
    encoder = {name: value.cpu() for name, value in encoder.items()}
    local = {name: value.cpu() for name, value in local.items()}
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


# ------------------------------------------------------------------ a diagnosis, as data
@dataclasses.dataclass
class Diagnosis:
    """What ``pyro-vae diagnose`` measures on a model: the fields of ``diagnostics.json``
    (see :meth:`to_dict`) and, beside them, what the files and plots are drawn from.

    ``nuts`` is :func:`nuts_summary`'s dict, ``guide_vs_nuts`` the moment comparison,
    ``gaps`` :func:`inference_gaps`'s (or ``{"skipped": ...}``), ``khat`` the k-hat
    summary; ``nuts_draws`` and ``guide_draws`` are ArviZ ``InferenceData``,
    ``khat_values`` one k-hat per image, ``worst`` the indices of the highest and
    ``worst_images`` those images, shaped for a grid.
    """

    run_dir: str
    image_ids: list[int]
    nuts: dict[str, Any]
    guide_vs_nuts: dict[str, float]
    gaps: dict[str, Any]
    khat: dict[str, Any]
    seconds: float
    nuts_draws: Any = dataclasses.field(repr=False)
    guide_draws: Any = dataclasses.field(repr=False)
    khat_values: np.ndarray = dataclasses.field(repr=False)
    worst: np.ndarray = dataclasses.field(repr=False)
    worst_images: torch.Tensor | None = dataclasses.field(repr=False)

    _JSON_FIELDS = ("run_dir", "image_ids", "nuts", "guide_vs_nuts", "gaps", "khat", "seconds")

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``diagnostics.json``."""
        return {name: getattr(self, name) for name in self._JSON_FIELDS}


def diagnose_model(
    vae: PyroModel,
    test: torch.Tensor,
    ids: Sequence[int],
    chains: int = 4,
    warmup: int = 300,
    samples: int = 300,
    is_samples: int = 5000,
    local_steps: int = 1000,
    khat_images: int = 1000,
    khat_samples: int = 1000,
    seed: int = 0,
    jit: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    compile: bool | None = None,
    run_dir: str = "",
) -> Diagnosis:
    """NUTS against the guide on ``test[ids]``, the inference gaps there, and PSIS k-hat
    on the first ``khat_images`` of ``test``; returns data and writes nothing.
    ``run_dir`` only labels the result."""
    x = test[list(ids)]
    started = time.perf_counter()
    if log:
        log(f"NUTS: {chains} chains x ({warmup} warmup + {samples} draws) on {len(ids)} images")
    nuts = nuts_posterior(vae, x, chains, warmup, samples, seed, ids, jit=jit, progress=progress)
    guide = guide_draws(vae, x, chains, samples, seed, ids)
    gaps = gaps_or_skipped(vae, x, is_samples, local_steps, seed, progress, compile, log)
    n_khat = min(khat_images, len(test))
    if log:
        log(f"PSIS k-hat on {n_khat} test images, K={khat_samples} ...")
    khat = khat_of_images(vae, test[:n_khat], khat_samples, seed, progress, compile)
    khat_result, worst = khat_report(khat, khat_samples)
    summary, moments = nuts_summary(nuts), _compare_moments(nuts, guide)
    return Diagnosis(
        run_dir=run_dir,
        image_ids=list(ids),
        nuts=summary,
        guide_vs_nuts=moments,
        gaps=gaps,
        khat=khat_result,
        seconds=time.perf_counter() - started,
        nuts_draws=nuts,
        guide_draws=guide,
        khat_values=khat,
        worst=worst,
        worst_images=_grid_images(vae, test, worst),
    )


def gaps_or_skipped(
    vae: PyroModel, x, is_samples, local_steps, seed, progress, compile, log=None
) -> dict[str, Any]:
    """:func:`inference_gaps` without the local guide, for a model with one latent layer;
    ``{"skipped": GAPS_SKIPPED}`` for others."""
    if len(latent_sites(vae, x)) != 1:
        return {"skipped": GAPS_SKIPPED}
    if log:
        log("gaps: local SVI per image, importance-sampled log p(x) ...")
    gaps = inference_gaps(
        vae, x, is_samples, local_steps=local_steps, seed=seed, progress=progress, compile=compile
    )
    gaps.pop("local_guide")
    return gaps


def _grid_images(vae: PyroModel, test: torch.Tensor, indices: np.ndarray) -> torch.Tensor | None:
    """``test[indices]`` as images (channels, height, width) for a grid; ``None`` for a
    model that does not say its data's shape (``data_shape``, optional in the protocol)
    and data that are not images already: that grid is then left out."""
    chosen = test[torch.as_tensor(indices, dtype=torch.long)]
    shape = getattr(vae, "data_shape", None)
    if shape is None:
        return chosen.cpu() if chosen.dim() == 4 else None
    shape = tuple(shape) if len(shape) == 3 else (1, 1, math.prod(shape))
    return chosen.reshape(-1, *shape).cpu()
