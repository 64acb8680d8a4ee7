"""Closed-form KL divergence between diagonal Gaussians (the seed tutorial's result)."""

from __future__ import annotations

import torch


def gaussian_kl(
    q_loc: torch.Tensor,
    q_scale: torch.Tensor,
    p_loc: torch.Tensor | float = 0.0,
    p_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    r"""KL(N(q_loc, q_scale^2) || N(p_loc, p_scale^2)) for diagonal Gaussians, in nats.

    Per latent dimension (Odaibo, "Tutorial: Deriving the Standard Variational
    Autoencoder (VAE) Loss Function", 2019, the line before its eq. 40):

    .. math::
        KL = \log\frac{\sigma_p}{\sigma_q} + \frac{\sigma_q^2 + (\mu_q - \mu_p)^2}{2\sigma_p^2}
             - \frac{1}{2},

    which for the standard prior (``p_loc = 0``, ``p_scale = 1``) is the familiar
    ``-KL = 1/2 (1 + log sigma_q^2 - sigma_q^2 - mu_q^2)`` (its eq. 40). Summed over the
    last dimension, so the result has the batch shape of the inputs broadcast together.
    """
    q_loc, q_scale, p_loc, p_scale = (
        torch.as_tensor(t, dtype=q_loc.dtype, device=q_loc.device)
        for t in (q_loc, q_scale, p_loc, p_scale)
    )
    # With r = sq^2 / sp^2 = exp(u): KL = 1/2 (r - 1 - log r) + (mq - mp)^2 / (2 sp^2).
    # r - 1 - log r = expm1(u) - u keeps its accuracy (and sign) when q is close to p;
    # the clamp removes only rounding error, as the term is >= 0 exactly.
    log_ratio = 2.0 * (torch.log(q_scale) - torch.log(p_scale))
    scale_term = (torch.expm1(log_ratio) - log_ratio).clamp_min(0.0)
    mahalanobis = ((q_loc - p_loc) / p_scale).pow(2)
    return 0.5 * (scale_term + mahalanobis).sum(-1)
