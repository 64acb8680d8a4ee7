"""An epoch's mini-batches, in one process or shared out over ``torchrun``'s."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from pyro_vae import distributed
from pyro_vae.data import VAEData
from pyro_vae.training.history import Progress


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for process ``rank`` at ``step`` of the run seeded ``seed`` (distinct for
    every triple in practice; 63 bits)."""
    mixed = (seed * 1_000_003 + rank) * 2_654_435_761 + step * 40_503
    return mixed % (2**63 - 1)


def epoch_batches(
    data: VAEData,
    batch_size: int,
    generator: torch.Generator,
    order: torch.Tensor | None,
    first: int,
    seed: int,
    progress: Progress,
) -> Iterator[tuple[torch.Tensor, int]]:
    """``(batch, global size)`` for each step of an epoch from batch ``first`` of
    permutation ``order`` on (``None``: drawn here from ``generator``): the whole batch
    in one process; under torchrun this process's part of the global batch. Every
    process draws the same permutation (the data generator is seeded alike and advances
    alike); each binarizes its part with noise of its own, seeded by ``seed``, the rank
    and the batch's index plus the run's step count as the batch is drawn
    (``progress.step``), so the noise needs no state of its own to resume."""
    if distributed.world_size() == 1:
        if order is None:  # (the epoch from its start: the data draw the permutation)
            batches = data.batches(batch_size, generator)
        else:
            batches = data.batches(batch_size, generator, order, first)
        for batch in batches:
            yield batch, batch.shape[0]
        return
    train = data.train.images
    if order is None:
        order = torch.randperm(len(train), generator=generator)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    rank = distributed.rank()
    for index in range(first, steps_per_epoch):
        start = index * batch_size
        indices = order[start : start + batch_size]
        batch = train[distributed.batch_part(indices)]
        if data.binarize == "dynamic":
            noise = torch.Generator().manual_seed(rank_seed(seed, rank, progress.step + index))
            batch = torch.bernoulli(batch, generator=noise)
        yield batch, len(indices)
