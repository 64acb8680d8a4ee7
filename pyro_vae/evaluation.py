"""Evaluation: importance-sampled log-likelihood (and, with the training tool, the rest)."""

from __future__ import annotations

import math

import torch

from .errors import UserInputError
from .estimators import log_importance_weights

#: Decoder outputs held at once by log_likelihood (samples x data points x dims).
DEFAULT_MAX_ELEMENTS = 2**25


def log_likelihood(
    vae,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    r"""Importance-sampled ``log p(x)`` per data point, in nats, float64.

    .. math::
        \log p(x) \approx L_K = \log \frac{1}{K} \sum_{k=1}^{K} \frac{p(x, z_k)}{q(z_k|x)},
        \quad z_k \sim q(z|x),

    the IWAE bound with large K (Burda et al., 2016, used K = 5000). It is a stochastic
    lower bound that tightens as K grows. Samples are drawn ``chunk_size`` at a time
    (vectorized), and each chunk's log-sum-exp is accumulated in float64, so memory is
    bounded by ``chunk_size * batch_size * data_dim`` whatever K is. Works for any
    model/guide pair whose sample sites live in the ``"data"`` plate.
    """
    if num_samples < 1:
        raise UserInputError(f"num_samples must be >= 1, got {num_samples}")
    x = vae.flatten(x)
    n = x.shape[0]
    if batch_size is None:
        batch_size = min(n, 100)
    if chunk_size is None:
        per_sample = max(1, batch_size * vae.data_dim)
        chunk_size = max(1, min(num_samples, DEFAULT_MAX_ELEMENTS // per_sample))
    if chunk_size < 1 or batch_size < 1:
        raise UserInputError("chunk_size and batch_size must be >= 1")
    chunks = [min(chunk_size, num_samples - start) for start in range(0, num_samples, chunk_size)]
    result = torch.empty(n, dtype=torch.float64, device=x.device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"log p(x), K={num_samples}", unit="pt", leave=False)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = x[start : start + batch_size]
            total = torch.full((batch.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
            for size in chunks:
                log_w = log_importance_weights(vae, batch, size).to(torch.float64)
                total = torch.logaddexp(total, torch.logsumexp(log_w, 0))
            result[start : start + batch.shape[0]] = total - math.log(num_samples)
            if bar is not None:
                bar.update(batch.shape[0])
    if bar is not None:
        bar.close()
    return result
