"""The compile decision: whether a run's steps replay a captured graph or run eagerly.

:class:`StepPath` owns the run's :class:`~pyro_vae.objectives.capture.CompiledLoss` and
decides once per run, when it starts, which path the steps take; the decision is kept
in the checkpoint so that a resumed run takes the path it started on (the two agree in
the parameters bit for bit but may round the reported bound differently).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from pyro_vae.objectives.capture import CompiledLoss, capture_pays


class StepPath:
    """The step path of one run: a captured graph of the loss, or the ELBO itself."""

    def __init__(
        self,
        loss: CompiledLoss,
        compile: bool | str,
        num_data: int,
        batch_size: int,
    ) -> None:
        #: the step's loss and gradients: the ELBO's, replayed from a captured graph
        self.loss = loss
        self.compile = compile
        self.num_data, self.batch_size = num_data, batch_size
        #: the decision of the run as started, ``(captured, epochs)``; ``None`` before
        self.recorded: tuple[bool, int] | None = None

    def compiles(self, steps_left: int) -> bool:
        """Whether steps replay a captured graph: ``compile``, or with ``"auto"``,
        whether capturing pays (:func:`~pyro_vae.objectives.capture.capture_pays`).

        The work counted is the ``steps_left`` in this run plus the steps this loss
        has already taken in this process: a caller who fits one epoch at a time in a
        loop trains eagerly until the eager steps have cost about what a capture costs,
        and from then on from graphs (the ski-rental rule: never more than about twice
        the best choice made in hindsight). Graphs already cached for the module as it
        is now cost nothing to capture.
        """
        if self.compile != "auto":
            return bool(self.compile)
        shapes = 2 if self.num_data % self.batch_size else 1
        needed = max(0, shapes - self.loss.cached_graphs())
        return capture_pays(steps_left + self.loss.calls(), graphs=needed)

    def choose(self, epochs: int, compiles: Callable[[], bool]) -> bool:
        """Set the path of a run of ``epochs`` epochs: the recorded one where the run was
        started with as many epochs (a resumed run), else ``compiles()``; return it. A
        captured graph chosen for an estimator whose loss cannot be traced is warned
        of (at the caller of the trainer's ``run``): it runs eagerly."""
        if self.recorded is not None and self.recorded[1] == epochs:
            self.loss.enabled = self.recorded[0]  # resumed: the path the run started on
        else:
            self.loss.enabled = compiles()
            self.recorded = (self.loss.enabled, epochs)
        if self.loss.enabled and self.loss.loss_fn is None:
            warnings.warn(
                f"pyro-vae: the loss runs eagerly: {self.loss.eager_reason}", stacklevel=3
            )
        return self.loss.enabled
