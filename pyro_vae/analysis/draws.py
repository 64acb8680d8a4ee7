"""Posterior draws as ArviZ ``InferenceData``, and the summaries the diagnosis reads.

NUTS's draws and the guide's (:func:`~pyro_vae.analysis.diagnostics.nuts_posterior`,
:func:`~pyro_vae.analysis.diagnostics.guide_draws`) are ``InferenceData`` with dims
``(chain, draw, image, <site>_dim)`` (:func:`inference_data`); :func:`nuts_summary` reads
a NUTS run's convergence, :func:`compare_moments` the guide's moments against NUTS's.
ArviZ is imported when first used (:func:`load_arviz`).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np


def load_arviz() -> Any:
    """ArviZ, imported without its notice of an API in transition."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing", category=FutureWarning)
        import arviz as az
    return az


def inference_data(posterior: dict[str, np.ndarray], image_ids, **groups):
    """ArviZ InferenceData with dims ``(chain, draw, image, <site>_dim)`` per site."""
    return load_arviz().from_dict(
        posterior=posterior,
        coords={"image": list(image_ids)},
        dims={name: ["image", f"{name}_dim"] for name in posterior},
        **groups,
    )


def nuts_summary(idata) -> dict[str, Any]:
    """Worst r-hat, smallest bulk and tail ESS, and divergences of a NUTS run."""
    az = load_arviz()
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


def compare_moments(nuts, guide, informed_sd: float = 0.5) -> dict[str, float]:
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
