r"""``tracegraph``: Pyro's :class:`~pyro.infer.TraceGraph_ELBO` on any guide, its guide
sites treated as not reparameterized, with a decaying-average or a learned baseline.

Schulman, Heess, Weber & Abbeel, "Gradient Estimation Using Stochastic Computation
Graphs" (2015); baselines as in Mnih & Gregor, "Neural Variational Inference and Learning
in Belief Networks" (2014). Per data point, with draws ``z ~ q_phi(z|x)`` carrying no
gradient (:class:`~pyro_vae.objectives.traces.DetachedDraws`, so Pyro's class takes the
score-function path for every site), the gradient is

.. math::
    \hat\nabla = \nabla_\theta \log p_\theta(x, z)
        + \sum_{\text{sites } s} \big(c_s - b_s\big)\, \nabla_\phi \log q_\phi(z_s | \cdot),

where ``c_s`` is the downstream cost of site s (only the terms of ``log p - log q`` its
draw influences: Pyro's Rao-Blackwellization by provenance, per data point) and ``b_s``
its baseline, set on the guide's sites from outside (``infer["baseline"]``; a site that
sets its own keeps it):

- ``"decaying"`` (default): Pyro's decaying average of the downstream cost,
  ``b <- beta b + (1 - beta) c``, kept in the param store per site (its shape follows the
  batch: when a batch of another size comes, the average restarts from its mean);
- ``"learned"``: ``b(x)``, a small network on the flattened data per site (one tanh layer
  of 32 units, output zero at the start), times the site's data scale, fitted to the
  downstream cost by its own Adam step inside each ``loss_and_grads`` (Pyro's baseline
  loss): a parameter of the estimator, not of the model;
- ``"none"``: no baseline.

The value is the ELBO of the same draws as ``mc`` (same noise, same value). The baselines
keep state between steps, so the estimator is never captured as a graph. Pyro's class has
no ``differentiable_loss``: :class:`~pyro_vae.objectives.adapters.LossAndGradsAdapter`
gives it one.
"""

from __future__ import annotations

from typing import Any

import pyro
import torch
from pyro.infer import TraceGraph_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import forked_rng
from pyro_vae.objectives.closed_form import _nesting, _PlateNestingFound
from pyro_vae.objectives.traces import DetachedDraws

#: the baselines of ``tracegraph``
BASELINES = ("decaying", "learned", "none")
#: the name Pyro's TraceGraph_ELBO keeps a site's decaying average under
_AVERAGE = "__baseline_avg_downstream_cost_"
_HIDDEN = 32


def _cost_shapes(msg: Any) -> tuple[torch.Size, torch.Size]:
    """The shape of a site's downstream cost in Pyro's TraceGraph_ELBO (the sizes of its
    plates, leading ones dropped), and the same with the leading ones kept."""
    frames = [frame for frame in msg["cond_indep_stack"] if frame.vectorized]
    full = [1] * max((-frame.dim for frame in frames), default=0)
    for frame in frames:
        full[frame.dim] = frame.size
    shape = list(full)
    while shape and shape[0] == 1:
        shape.pop(0)
    return torch.Size(shape), torch.Size(full)


class _Baselines(Messenger):
    """Sets ``infer["baseline"]`` on every latent sample site of the guide it wraps."""

    def __init__(self, elbo: TraceGraphELBO, x: torch.Tensor | None) -> None:
        super().__init__()
        self.elbo, self.x = elbo, x

    def _pyro_sample(self, msg: Any) -> None:
        if msg["is_observed"] or site_is_subsample(msg):
            return
        infer = msg["infer"] if msg["infer"] is not None else {}
        msg["infer"] = infer
        if "baseline" in infer or self.elbo.baseline == "none":
            return
        shape, full = _cost_shapes(msg)
        if self.elbo.baseline == "decaying":
            store = pyro.get_param_store()
            name = _AVERAGE + msg["name"]
            if name in store and store[name].shape != shape:
                store[name] = store[name].detach().mean().expand(shape).clone()
            infer["baseline"] = {
                "use_decaying_avg_baseline": True,
                "baseline_beta": self.elbo.baseline_beta,
            }
            return
        value = self.elbo.learned_baseline(msg["name"], self.x) * msg["scale"]
        infer["baseline"] = {"baseline_value": value.expand(full).reshape(shape)}


class TraceGraphELBO(_PlateNestingFound, TraceGraph_ELBO):
    """Pyro's ``TraceGraph_ELBO`` with every guide site scored and a baseline on each
    (see the module's docstring); it finds its plate nesting in a forked random stream."""

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float | None = None,
        baseline: str = "decaying",
        baseline_beta: float = 0.9,
        baseline_lr: float = 1e-3,
    ) -> None:
        if baseline not in BASELINES:
            raise UserInputError(
                f"tracegraph's baseline must be one of {', '.join(BASELINES)}, got {baseline!r}"
            )
        super().__init__(
            num_particles=num_particles,
            vectorize_particles=num_particles > 1,
            max_plate_nesting=_nesting(max_plate_nesting),
        )
        self.baseline, self.baseline_beta, self.baseline_lr = baseline, baseline_beta, baseline_lr
        #: the learned baselines, one network per guide site (``baseline="learned"``)
        self.baselines = nn.ModuleDict()
        self._optimizer: torch.optim.Optimizer | None = None

    def _get_trace(self, model, guide, args, kwargs):
        x = args[0] if args and torch.is_tensor(args[0]) else None
        guide = DetachedDraws()(_Baselines(self, x)(guide))
        return super()._get_trace(model, guide, args, kwargs)

    def learned_baseline(self, site: str, x: torch.Tensor | None) -> torch.Tensor:
        """``b(x)`` of ``site`` per data point ``(batch,)``, the network made on first use."""
        if x is None or x.dim() < 1:
            raise UserInputError(
                "tracegraph's learned baseline reads the data from the guide's first "
                "argument, a tensor (batch, ...): this guide has none; use "
                "baseline=decaying"
            )
        inputs = x.detach().reshape(x.shape[0], -1).float()
        key = site.replace(".", "_")
        if key not in self.baselines:
            with forked_rng():
                hidden, out = nn.Linear(inputs.shape[-1], _HIDDEN), nn.Linear(_HIDDEN, 1)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.baselines[key] = nn.Sequential(hidden, nn.Tanh(), out).to(inputs.device)
            self._optimizer = torch.optim.Adam(self.baselines.parameters(), lr=self.baseline_lr)
        return self.baselines[key](inputs).squeeze(-1)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """Pyro's ``loss_and_grads``; then the learned baselines take their Adam step on
        their own loss, and leave no gradient behind."""
        loss = super().loss_and_grads(model, guide, *args, **kwargs)
        if self._optimizer is not None:
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        return loss


def tracegraph(
    num_particles: int,
    *,
    max_plate_nesting: float | None = None,
    baseline: str = "decaying",
    baseline_beta: float = 0.9,
    baseline_lr: float = 1e-3,
) -> TraceGraphELBO:
    """``tracegraph``: Pyro's TraceGraph_ELBO, every guide site scored, with a baseline."""
    return TraceGraphELBO(num_particles, max_plate_nesting, baseline, baseline_beta, baseline_lr)
