"""The guide's importance weights on chosen images: ELBO, log p(x) and PSIS k-hat.

:func:`importance_summary` gives, from one set of draws per image, the ELBO with its
standard error, the importance-sampled log p(x) and k-hat (the inference gaps read it);
:func:`khat_of_images` and :func:`khat_report` give the k-hat section of
``diagnostics.json``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyro
import torch

from pyro_vae.analysis.evaluation import (
    _sizes,
    _weight_chunks,
    evaluation_mode,
    importance_weights,
    log_likelihood_and_khat,
)
from pyro_vae.analysis.psis import KHAT_MIN_SAMPLES, KHAT_THRESHOLD, khat_summary, psis_khat
from pyro_vae.models.protocol import PyroModel, as_batch, forked_rng


def importance_summary(
    vae: PyroModel, x: torch.Tensor, num_samples: int, compile: bool | None = None
) -> dict[str, torch.Tensor]:
    """From K draws of the guide, per image: the ELBO (mean log-weight) with its standard
    error, the importance-sampled log p(x), and PSIS k-hat: one set of weights for all.

    The ELBO here uses ``log p(x, z) - log q(z|x)`` at each draw (Monte Carlo KL): near
    the posterior that is almost constant in z, so its estimate is far more precise than
    the closed-form-KL one, whose reconstruction term alone keeps its variance.
    """
    x = as_batch(vae, x)
    n = x.shape[0]
    chunk, _ = _sizes(x, num_samples, None, n)
    with torch.no_grad(), pyro.validation_enabled(False), evaluation_mode(vae):
        weights = importance_weights(vae, n, num_samples, chunk, n, compile)
        log_w = torch.cat(list(_weight_chunks(weights, x, num_samples, chunk)))
    return {
        "elbo": log_w.mean(0),
        "elbo_se": log_w.std(0) / math.sqrt(num_samples),
        "log_likelihood": torch.logsumexp(log_w, 0) - math.log(num_samples),
        "khat": torch.as_tensor(psis_khat(log_w)),
    }


def khat_of_images(
    vae: PyroModel,
    x: torch.Tensor,
    num_samples: int,
    seed: int,
    progress: bool = False,
    compile: bool | None = None,
) -> np.ndarray:
    """PSIS k-hat of the encoder's importance weights, one per image; seeded, the global
    RNG untouched."""
    with forked_rng(), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        _, khat = log_likelihood_and_khat(vae, x, num_samples, progress=progress, compile=compile)
    return khat


def khat_report(khat: np.ndarray, num_samples: int) -> tuple[dict[str, Any], np.ndarray]:
    """The k-hat summary of ``diagnostics.json`` and the (up to 16) worst images' indices;
    with too few samples for a Pareto fit, a note and no indices."""
    fitted = num_samples >= KHAT_MIN_SAMPLES and bool(np.isfinite(khat).any())
    worst = np.argsort(-np.nan_to_num(khat, nan=-np.inf))[:16] if fitted else np.array([], int)
    result: dict[str, Any] = {"images": len(khat), "samples": num_samples}
    if not fitted:
        result["note"] = khat_summary(khat, num_samples)["khat_note"]
        return result, worst
    finite = khat[np.isfinite(khat)]
    result.update(
        {
            "mean": float(finite.mean()),
            "max": float(finite.max()),
            "share_above_0.7": float((finite > KHAT_THRESHOLD).mean()),
            "share_above_0.5": float((finite > 0.5).mean()),
            "worst": [{"image": int(i), "khat": float(khat[i])} for i in worst],
        }
    )
    return result, worst
