"""An epoch in progress: where it started, its running bound, its time, its progress bar."""

from __future__ import annotations

import time
from typing import Any

import torch


class EpochRecord:
    """The running record of one pass over the training set.

    ``position``: where a run stopped inside the epoch (a preempted run, ``None``: the
    epoch from its start), whose permutation is drawn again from the data generator's
    state it kept; else the epoch's permutation is drawn by the batches from
    ``generator``'s state now, which the record keeps in case the epoch is stopped."""

    bar: Any

    def __init__(
        self,
        position: dict[str, Any] | None,
        generator: torch.Generator,
        num_data: int,
        bar: tuple[int, str, bool],
    ) -> None:
        #: the permutation where already drawn (``None``: drawn by the batches)
        self.order: torch.Tensor | None = None
        if position is None:
            self.epoch_rng = generator.get_state()
            self.first, self.total, self.count, self.elapsed = 0, 0.0, 0, 0.0
        else:
            self.epoch_rng = position["epoch_rng"]
            replay = torch.Generator().set_state(self.epoch_rng)
            self.order = torch.randperm(num_data, generator=replay)
            self.first, self.total = position["steps"], position["total"]
            self.count, self.elapsed = position["count"], position["seconds"]
        self.started, self.done = time.perf_counter(), self.first
        self.num_data = num_data
        from tqdm.auto import tqdm

        steps, desc, progress = bar
        disable = None if progress else True
        #: the progress bar (``bar``: the epoch's steps, its title, whether it shows)
        self.bar = tqdm(
            total=steps, initial=self.first, desc=desc, leave=False, disable=disable, unit="step"
        )

    def add(self, reported: float, size: int) -> None:
        """One step's bound (``reported``: the loss of a global batch of ``size`` points,
        scaled to the data set)."""
        self.total += -reported / self.num_data * size
        self.count += size
        self.done += 1
        bar = self.bar
        bar.update()
        if bar.n % 10 == 0 or bar.n == bar.total:
            bar.set_postfix_str(f"elbo {self.total / self.count:.2f}", refresh=False)

    def seconds(self) -> float:
        """The epoch's training time so far (before a preemption included)."""
        return self.elapsed + time.perf_counter() - self.started

    def step_seconds(self, steps: int) -> float | None:
        """The mean time of this call's first ``steps`` steps, once they are done."""
        if self.done - self.first != steps:
            return None
        return (time.perf_counter() - self.started) / steps

    def mean(self) -> float:
        """The mean training bound per data point."""
        return self.total / self.count

    def position(self) -> dict[str, Any]:
        """Where the epoch stands, as a checkpoint keeps it (see ``state.checked_position``)."""
        return {
            "steps": self.done,
            "total": self.total,
            "count": self.count,
            "epoch_rng": self.epoch_rng,
            "seconds": self.seconds(),
        }
