r"""``ciwae``: a convex combination of the ELBO and the IWAE bound of the same draws.

Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh, "Tighter Variational Bounds are Not
Necessarily Better" (2018). With K reparameterized draws and log-weights ``log w_k``,
per data point:

.. math::
    \mathrm{CIWAE}_\beta = \beta\, \frac1K \sum_k \log w_k
        + (1 - \beta) \log \frac1K \sum_k w_k,

a lower bound on log p(x) for every beta in [0, 1] (a mixture of two), with its
reparameterized gradient. ``beta = 1`` is ``mc`` (the ELBO of K draws) and ``beta = 0``
is ``iwae``, for the same noise; the ELBO's part keeps the encoder's signal-to-noise
ratio from vanishing as K grows. The paper's best on MNIST was beta = 0.05.
"""

from __future__ import annotations

import torch

from pyro_vae.objectives.importance import LogWeightBound, log_mean_exp


class CombinationIWAE(LogWeightBound):
    """CIWAE(beta) with its reparameterized gradient (see the module's docstring)."""

    estimator = "ciwae"

    def __init__(
        self, num_particles: int = 5, beta: float = 0.5, max_plate_nesting: float | None = None
    ):
        super().__init__(num_particles, max_plate_nesting)
        self.beta = float(beta)

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """CIWAE per data point from log-weights ``(K, batch)``."""
        return self.beta * log_w.mean(0) + (1.0 - self.beta) * log_mean_exp(log_w)


def ciwae(
    num_particles: int, *, max_plate_nesting: float | None = None, beta: float = 0.5
) -> CombinationIWAE:
    """``ciwae``: beta * ELBO + (1 - beta) * L_K of the same K draws."""
    return CombinationIWAE(num_particles, beta, max_plate_nesting)
