"""Pareto-smoothed importance sampling diagnostics of the guide's importance weights:
k-hat per data point, through ArviZ, and its summary over a data set.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

#: PSIS k-hat above this: importance sampling is unreliable (Vehtari et al., 2024).
KHAT_THRESHOLD = 0.7
#: Fewest importance samples for which ArviZ fits a Pareto tail at all: it fits the
#: largest ceil(min(K / 5, 3 sqrt(K))) weights and needs more than 4 of them (below, k-hat
#: is infinite). The estimate is still noisy for K below a few hundred.
KHAT_MIN_SAMPLES = 21


def psis_khat(log_weights: torch.Tensor | np.ndarray) -> np.ndarray:
    """Pareto k-hat of the importance weights of each data point, through ArviZ.

    ``log_weights`` is ``(K, batch)``: ``log p(x, z_k) - log q(z_k|x)``. These are the
    log importance ratios themselves, so they go to :func:`arviz.psislw` with a plus
    sign (PSIS-LOO passes ``-log_likelihood`` because its ratios are 1/p(y_i|theta)).
    ArviZ takes samples on the last axis. k-hat > 0.7 means the estimate is unreliable.
    With fewer than ``KHAT_MIN_SAMPLES`` weights there is no tail to fit: NaN.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing", category=FutureWarning)
        import arviz as az

    weights = log_weights.detach().cpu().numpy() if torch.is_tensor(log_weights) else log_weights
    if weights.shape[0] < KHAT_MIN_SAMPLES:  # too few for the tail fit: NaN, not a crash
        return np.full(weights.shape[1:], np.nan)
    with warnings.catch_warnings():
        # ArviZ warns when k-hat is large; we report it instead
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        _, khat = az.psislw(np.ascontiguousarray(np.asarray(weights, dtype=np.float64).T))
    return np.asarray(khat, dtype=np.float64)


def khat_summary(khat: np.ndarray, num_samples: int) -> dict[str, Any]:
    """Mean, max and share above 0.7 of PSIS k-hat, or ``None`` with the reason when K
    is too small for a Pareto fit (never an infinity presented as a measurement)."""
    finite = khat[np.isfinite(khat)]
    if num_samples < KHAT_MIN_SAMPLES or finite.size == 0:
        return {
            "khat_mean": None,
            "khat_max": None,
            "khat_share_above_0.7": None,
            "khat_note": f"not computed: K={num_samples} importance samples are too few for "
            f"a Pareto fit of the weights' tail (ArviZ needs K >= {KHAT_MIN_SAMPLES}; "
            f"estimates are reliable from a few hundred)",
        }
    return {
        "khat_mean": float(finite.mean()),
        "khat_max": float(finite.max()),
        "khat_share_above_0.7": float(np.mean(finite > KHAT_THRESHOLD)),
        "khat_images": int(finite.size),
    }
