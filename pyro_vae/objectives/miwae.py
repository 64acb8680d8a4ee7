r"""``miwae``: the average of M independent IWAE bounds of K draws each, per data point.

Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh, "Tighter Variational Bounds are Not
Necessarily Better" (2018). With M * K draws ``z_{m,k} ~ q_phi(z|x)`` (reparameterized)
and ``log w_{m,k} = log p_theta(x, z_{m,k}) - log q_phi(z_{m,k}|x)``:

.. math::
    \mathrm{MIWAE}(M, K) = \frac1M \sum_{m=1}^M \log \frac1K \sum_{k=1}^K w_{m,k},

a lower bound on log p(x) (each term is an L_K), looser than L_{MK} for the same draws.
Its reparameterized gradient trades the decoder's signal-to-noise ratio, which grows as
O(sqrt(MK)), against the encoder's, which goes as O(sqrt(M/K)): M = 1 is IWAE (encoder
SNR falling with K), K = 1 the ELBO of M draws.

Counts: ``num_particles`` is K, the draws inside each bound; the option ``outer`` is M.
The built estimator's ``num_particles`` attribute is M * K, the draws per data point it
takes (the particle plate's size, what an equal-samples budget counts). ``miwae`` with
``outer = 1`` is ``iwae`` (same noise, same value and gradient).
"""

from __future__ import annotations

import torch

from pyro_vae.objectives.importance import LogWeightBound, log_mean_exp


class MultipleIWAE(LogWeightBound):
    """MIWAE(M, K) with its reparameterized gradient (see the module's docstring).

    :param inner: K, the draws in each IWAE bound.
    :param outer: M, the bounds averaged.
    """

    estimator = "miwae"

    def __init__(self, inner: int = 8, outer: int = 8, max_plate_nesting: float | None = None):
        super().__init__(inner * outer, max_plate_nesting)
        self.inner, self.outer = int(inner), int(outer)

    def groups(self, log_w: torch.Tensor) -> torch.Tensor:
        """Log-weights ``(M * K, batch)`` as ``(M, K, batch)``: M independent groups."""
        return log_w.reshape(self.outer, self.inner, log_w.shape[-1])

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """MIWAE(M, K) per data point from log-weights ``(M * K, batch)``."""
        return log_mean_exp(self.groups(log_w), 1).mean(0)


def miwae(
    num_particles: int, *, max_plate_nesting: float | None = None, outer: int = 8
) -> MultipleIWAE:
    """``miwae``: MIWAE(M = outer, K = num_particles)."""
    return MultipleIWAE(num_particles, outer, max_plate_nesting)
