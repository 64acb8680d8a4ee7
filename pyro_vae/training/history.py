"""What a run has done so far: its per-epoch metrics (:class:`History`), its position
(:class:`Progress`), its limits (:class:`Budget`), and the console line of an epoch
(:func:`format_epoch`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class History:
    """Per-epoch metrics of a run (nats per data point; higher ELBO is better)."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    best_epoch: int | None = None

    def __getitem__(self, key: str) -> list[Any]:
        return [epoch.get(key) for epoch in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def last(self) -> dict[str, Any]:
        return self.epochs[-1] if self.epochs else {}


@dataclass(frozen=True)
class Budget:
    """A run's limits besides its epochs: ``max_steps`` optimizer steps, ``max_seconds``
    of training steps (``None``: none)."""

    max_steps: int | None
    max_seconds: float | None

    def spent(self, step: int, history: History, epoch_seconds: float = 0.0) -> bool:
        """Whether ``step`` steps reach ``max_steps``, or the training steps of the
        finished epochs (their ``seconds``) and ``epoch_seconds`` of the one in progress
        reach ``max_seconds``."""
        if self.max_steps is not None and step >= self.max_steps:
            return True
        if self.max_seconds is None:
            return False
        return bool(sum(history["seconds"]) + epoch_seconds >= self.max_seconds)


class Progress(Protocol):
    """Where a run is: epochs finished and optimizer steps taken (the trainer's, read by
    the pieces that report them and rewound by the finite guard's rollback)."""

    epoch: int
    step: int


def format_epoch(metrics: dict[str, Any], epochs: int) -> str:
    """One line per epoch: the bound, the test ELBO and its two terms, the time."""
    line = (
        f"epoch {metrics['epoch']:>3}/{epochs}  train {metrics['train_elbo']:9.3f}  "
        f"test elbo {metrics['test_elbo']:9.3f} = E[log p(x|z)] "
        f"{metrics['test_expected_log_likelihood']:9.3f} - KL {metrics['test_kl']:7.3f}"
    )
    if "validation_elbo" in metrics:
        line += f"  valid {metrics['validation_elbo']:9.3f}"
    return line + f"  {metrics['seconds']:6.2f} s"
