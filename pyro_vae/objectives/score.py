r"""``score``: the score-function (REINFORCE) gradient of the ELBO, for any guide.

Williams, "Simple statistical gradient-following algorithms for connectionist
reinforcement learning" (1992); for variational inference, Paisley, Blei & Jordan (2012),
Ranganath, Gerrish & Blei, "Black Box Variational Inference" (2014). With K draws
``z_k ~ q_phi(z|x)`` that carry no gradient (the estimator treats every guide site as not
reparameterized, :class:`~pyro_vae.objectives.traces.DetachedDraws`, so it applies to
any guide unchanged) and ``f_k = log p_theta(x, z_k) - log q_phi(z_k|x)``, per data point:

.. math::
    \hat L = \frac1K \sum_k f_k, \qquad
    \hat\nabla = \frac1K \sum_k \Big[\nabla f_k + (f_k - b_k)\,
        \nabla_\phi \log q_\phi(z_k|x)\Big],

the exact derivative of ``E_q[f]`` written as an expectation (``nabla f_k`` is
``nabla_theta log p`` and ``-nabla_phi log q``; the latter has expectation zero and is kept,
as in VIMCO's gradient, so that ``vimco`` with one particle is this estimator). The value
is the ELBO of the same draws as ``mc`` (same noise, same value). Baseline ``b_k``:
``"none"`` (plain REINFORCE, the default), or ``"leave-one-out"``, the mean of the other
particles' ``f_j`` (independent of ``z_k``, so the gradient stays unbiased; none with one
particle). Unbiased, and far noisier than the reparameterized gradient: the reason the
reparameterization trick matters.
"""

from __future__ import annotations

import torch

from pyro_vae.errors import UserInputError
from pyro_vae.objectives.traces import ParticleELBO, log_weights, score_log_density

#: the baselines of ``score``
BASELINES = ("none", "leave-one-out")


def leave_one_out_mean(values: torch.Tensor) -> torch.Tensor:
    """``(1/(K-1)) sum_{j != k} values_j`` for each k over dim 0 ``(K, batch)``; zeros
    with one particle (there are no others)."""
    count = values.shape[0]
    if count == 1:
        return torch.zeros_like(values)
    return (values.sum(0, keepdim=True) - values) / (count - 1)


class ScoreFunctionELBO(ParticleELBO):
    """The ELBO with the score-function gradient (see the module's docstring)."""

    estimator = "score"
    detached_draws = True

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float | None = None,
        baseline: str = "none",
    ) -> None:
        if baseline not in BASELINES:
            raise UserInputError(
                f"score's baseline must be one of {', '.join(BASELINES)}, got {baseline!r}"
            )
        super().__init__(num_particles, max_plate_nesting)
        self.baseline = baseline

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        log_w, scale = log_weights(model_trace, guide_trace, self.num_particles)
        log_q = score_log_density(guide_trace, self.num_particles)
        signal = log_w.detach()
        if self.baseline == "leave-one-out":
            signal = signal - leave_one_out_mean(signal)
        surrogate = (log_w + signal * log_q).mean(0)
        return log_w.detach().mean(0), surrogate, scale


def score(
    num_particles: int, *, max_plate_nesting: float | None = None, baseline: str = "none"
) -> ScoreFunctionELBO:
    """``score``: the ELBO with the REINFORCE gradient."""
    return ScoreFunctionELBO(num_particles, max_plate_nesting, baseline)
