"""One optimizer step of SVI, and the objectives it uses.

Each step computes the estimator's loss (``elbo.differentiable_loss``, a Pyro ELBO on
the Pyro model and guide) and its gradients, averages them over the processes under
``torchrun``, checks that loss and gradients are finite
(:class:`~pyro_vae.training.guard.FiniteGuard`), and only then lets the optimizer step.
The finite check before each step is why the loop does not call
``pyro.infer.SVI.step``, which steps at once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyro_vae import distributed
from pyro_vae.config import TrainConfig
from pyro_vae.data import VAEData
from pyro_vae.models.protocol import PyroModel, plate_nesting, scaled
from pyro_vae.objectives.capture import CompiledLoss
from pyro_vae.objectives.free_bits import FreeBitsELBO
from pyro_vae.objectives.registry import (
    Estimator,
    Objective,
    check_estimator_fits,
    estimator_spec,
    make_elbo,
)
from pyro_vae.training import preemption
from pyro_vae.training.compilation import StepPath
from pyro_vae.training.guard import FiniteGuard
from pyro_vae.training.history import Progress
from pyro_vae.training.optimization import Optimization
from pyro_vae.training.schedules import LatentScale


def build_objectives(
    spec: Estimator, config: TrainConfig, vae: PyroModel, images: torch.Tensor
) -> tuple[Objective, Objective]:
    """The estimator a run trains with (free bits around it with ``config.free_bits``),
    and the objective whose value the history records: the estimator's own, or for one
    without a value (a surrogate only) the Monte Carlo ELBO of the same batch."""
    # the particle plate's place is known before the first step: no estimator has to
    # find it while the fast path captures its graph
    nesting = plate_nesting(vae, images)
    elbo: Objective
    if config.free_bits:
        kl = "analytic" if spec.name == "analytic" else "mc"
        elbo = FreeBitsELBO(config.particles, config.free_bits, kl, nesting)
    else:
        elbo = spec.build(
            config.particles, max_plate_nesting=nesting, options=config.estimator_options
        )
    value = elbo if spec.has_value else make_elbo("mc", max_plate_nesting=nesting)
    return elbo, value


def build_step(
    vae: PyroModel,
    module: torch.nn.Module,
    data: VAEData,
    config: TrainConfig,
    optimization: Optimization,
    guarding: tuple[Path | None, Progress],
) -> Step:
    """The step of a run of ``vae`` (``module``: the same object, as a torch module) on
    ``data`` under ``config``: the estimator checked against the model, its objectives,
    the step path, the optimizer over the parameters (after the model has run, so that
    a lazy module has them), the finite guard (``guarding``: the run folder and the
    run's progress, which its messages name and its rollback rewinds)."""
    spec = estimator_spec(config.estimator)
    check_estimator_fits(spec, vae, data.train.images[:2])
    objectives = build_objectives(spec, config, vae, data.train.images[:2])
    # the step's loss and gradients: the ELBO's, replayed from a captured graph; the
    # trainer refreshes the graph's view of the networks at the start of each epoch
    loss = CompiledLoss(objectives[0], vae, refresh_every_call=False, capture=spec.capture)
    path = StepPath(loss, config.compile, len(data.train), config.batch_size)
    # every parameter: frozen ones get no gradient and are skipped by the step, and a
    # callback may unfreeze them between epochs
    parameters: list[torch.Tensor] = list(module.parameters())
    optimizer = optimization.build(parameters)
    run_dir, progress = guarding
    limit = optimization.gradient_limit
    guard = FiniteGuard(module, optimizer, parameters, limit, run_dir, progress)
    return Step(vae, spec, objectives, path, guard, list(module.buffers()))


class Step:
    """The optimizer step of one mini-batch, the same averaged step on every process."""

    def __init__(
        self,
        vae: PyroModel,
        estimator: Estimator,
        objectives: tuple[Objective, Objective],
        path: StepPath,
        guard: FiniteGuard,
        buffers: list[torch.Tensor],
    ) -> None:
        self.vae = vae
        #: the estimator's spec: what it is and what may be assumed of it
        self.estimator = estimator
        self.elbo, self.value_elbo = objectives
        self.path, self.loss = path, path.loss
        self.guard, self.optimizer, self.parameters = guard, guard.optimizer, guard.parameters
        self.buffers = buffers
        # under torchrun: the processes, all training one model
        self.world = distributed.world_size()

    def __call__(self, batch: torch.Tensor, scale: float, factor: float) -> tuple[float, bool]:
        """Step on ``batch`` (``scale``: the data set over the global batch; ``factor``:
        the KL factor); return the bound recorded (unannealed) and whether any process
        was asked to stop."""
        vae = self.vae
        self.optimizer.zero_grad(set_to_none=True)
        loss: float
        reported: float
        if batch.shape[0] == 0:  # (a last batch smaller than the processes)
            loss = reported = 0.0
        elif factor < 1.0 or self.value_elbo is not self.elbo:
            with LatentScale(factor):
                loss = self.loss_and_grads(batch, scale)
            with torch.no_grad():  # the bound itself, unannealed, for the record
                reported = self.value_elbo.loss(
                    scaled(vae.model, scale), scaled(vae.guide, scale), batch
                )
        else:
            loss = reported = self.loss_and_grads(batch, scale)
        squares = self.loss.grad_square_sum if batch.shape[0] else None
        stop = preemption.requested() is not None
        if self.world > 1:  # the same averaged step on every process
            mean, stop = distributed.average_step_and_flag(
                loss, self.parameters, self.buffers, stop
            )
            if factor < 1.0 or self.value_elbo is not self.elbo:
                reported = distributed.all_sum([reported])[0] / self.world
            else:
                reported = mean
            loss, squares = mean, None
        # (a surrogate without a value is checked through the value recorded)
        checked = loss if self.value_elbo is self.elbo else -reported
        self.guard.check_step(checked, squares)  # None after an eager step
        self.optimizer.step()
        return reported, stop

    def loss_and_grads(self, batch: torch.Tensor, scale: float) -> float:
        """The estimator's loss (a float) and its gradient in the parameters' ``.grad``.

        The mini-batch's bound is scaled to the data set by ``poutine.scale`` around model
        and guide (``scale``: ``num_data / batch`` in one process), so a model needs no
        ``num_data`` argument."""
        return self.loss.loss_and_grads(batch, scale=scale)
