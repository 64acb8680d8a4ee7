"""Finite checks before each step and after each epoch, and the rollback they may need.

A step is taken only if its loss and gradients are finite (and, for Adam, gradients
whose squares fit in float32); after an epoch, parameters and optimizer state must be
finite before anything is written. Where the parameters themselves became non-finite,
the model and optimizer go back to their state at the start of the epoch before the
run stops with :class:`~pyro_vae.errors.NonFiniteError`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from pyro_vae.errors import NonFiniteError
from pyro_vae.objectives.capture import largest, passes_fast, square_sum
from pyro_vae.training.checkpoint import CHECKPOINT, non_finite
from pyro_vae.training.history import Progress
from pyro_vae.training.optimization import GRADIENT_LIMIT


class FiniteGuard:
    """The finite checks of one run, and the epoch-start state they roll back to."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        parameters: list[torch.Tensor],
        limit: float,
        run_dir: Path | None,
        progress: Progress,
    ) -> None:
        self.module, self.optimizer, self.parameters = module, optimizer, parameters
        #: the largest gradient entry a step may take (see ``optimization.gradient_limit``)
        self.limit = limit
        self.run_dir = run_dir
        self.progress = progress
        self._epoch_start: tuple[dict[str, Any], dict[str, Any], int] | None = None

    def mark_epoch_start(self) -> None:
        """Keep what a failed epoch goes back to (a few MB, once per epoch)."""
        self._epoch_start = (
            copy.deepcopy(self.module.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
            self.progress.step,
        )

    def check_step(self, loss: float, grad_square_sum: float | None) -> None:
        """Stop the run, with a true message, unless the step about to be taken is safe.

        Safe: a finite loss, finite gradients and, for Adam, gradients whose squares fit
        in float32 (Adam's second moment holds them: an overflow there leaves ``inf`` in
        the optimizer state): every entry at most ``limit`` in magnitude. The sum of the
        squares of all entries (``grad_square_sum``: the captured graph computes it as
        each gradient is produced; after an eager step it is computed here) settles that
        in the common case (:func:`~pyro_vae.objectives.capture.compiled.passes_fast`);
        where it does not (it overflowed, or some entry is not finite), the largest entry
        decides, so the check's verdict is the largest entry's. If the parameters
        themselves are no longer finite, an earlier update of this epoch overflowed: the
        model and optimizer go back to their state at the start of the epoch before the
        error is raised.
        """
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not grads:
            return
        if grad_square_sum is None:
            grad_square_sum = float(square_sum(grads))
        if math.isfinite(loss) and passes_fast(grad_square_sum, self.limit):
            return
        grad_max = float(torch.stack([largest(g) for g in grads]).amax())
        if math.isfinite(loss) and math.isfinite(grad_max) and grad_max <= self.limit:
            return
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        epoch = self.progress.epoch
        where = f"epoch {epoch + 1}, step {self.progress.step + 1}"
        kept = (
            f"; the last checkpoint ({self.run_dir / CHECKPOINT}, epoch {epoch}) is intact"
            if self.run_dir is not None and epoch > 0
            else ""
        )
        if not all(bool(torch.isfinite(p).all()) for p in self.parameters):
            self.restore_epoch_start()
            raise NonFiniteError(
                f"an update before {where} overflowed: the parameters became non-finite with "
                f"learning rate {lr:g}; the model is back at its state at the start of epoch "
                f"{epoch + 1}{kept}. Lower the learning rate (`lr`)"
            )
        if not (math.isfinite(loss) and math.isfinite(grad_max)):
            what = "loss" if not math.isfinite(loss) else "gradient"
            raise NonFiniteError(
                f"non-finite {what} at {where} (loss {loss:g}, largest gradient entry "
                f"{grad_max:g}); the step was not taken, the parameters are finite{kept}. "
                f"Likely causes: a learning rate too high (now {lr:g}: lower `lr`), data "
                f"outside the likelihood's support, or a too aggressive estimator setting"
            )
        raise NonFiniteError(
            f"gradient entries up to {grad_max:.3g} at {where}: Adam squares them, which "
            f"overflows float32 (above {GRADIENT_LIMIT:.3g}); the step was not taken{kept}. "
            f"Lower the learning rate (now {lr:g}: `lr`), or use `optimizer='clipped_adam'`"
        )

    def check_epoch(self) -> None:
        """After an epoch, before anything is written: parameters and optimizer state are
        all finite, or the model goes back to the epoch's start and the run stops."""
        for part, state in (
            ("parameters", self.module.state_dict()),
            ("optimizer state", self.optimizer.state_dict()["state"]),
        ):
            bad = non_finite(state)
            if bad is not None:
                lr = self.optimizer.param_groups[0]["lr"]
                self.restore_epoch_start()
                raise NonFiniteError(
                    f"the {part} became non-finite during epoch {self.progress.epoch + 1} "
                    f"({bad}) with learning rate {lr:g}; the model is back at its state at "
                    f"the start of the epoch and nothing of the epoch was written. Lower the "
                    f"learning rate (`lr`)"
                )

    def restore_epoch_start(self) -> None:
        """Model, optimizer and step count as they were at the start of the epoch."""
        assert self._epoch_start is not None, "no epoch has started"
        model, optimizer, step = self._epoch_start
        self.module.load_state_dict(model)
        self.optimizer.load_state_dict(optimizer)
        self.progress.step = step
