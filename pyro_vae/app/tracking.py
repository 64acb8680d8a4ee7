"""Experiment tracking in TensorBoard, beside ``metrics.jsonl``.

:class:`TensorBoardLogger` is a ``fit`` callback: every number of each epoch's metrics
becomes a scalar (``elbo/train``, ``elbo/test``, ``kl/test``, ``lr``, ...) at the epoch
as step; :meth:`TensorBoardLogger.log_images` adds the reconstruction and prior-sample
grids. Written through ``torch.utils.tensorboard`` (the ``tensorboard`` package) into
``RUN/tensorboard``; compare runs with ``tensorboard --logdir runs``. On resume, events
after the checkpoint's epoch (written by the interrupted process) are purged, so the
curves show each epoch once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import (
    forked_rng,
    image_shape,
    on_model_device,
    prior_samples,
    reconstruct,
)

if TYPE_CHECKING:
    from pyro_vae.models.protocol import PyroModel


def _writer(log_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserInputError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard "
            "(or pip install 'pyro-vae[dev]')"
        ) from None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def scalar_tags(metrics: dict[str, Any]) -> dict[str, float]:
    """TensorBoard tags for an epoch's metrics: ``test_elbo`` -> ``elbo/test``, grouped by
    quantity so that train and test curves share a chart; non-numbers are skipped."""
    tags = {}
    for key, value in metrics.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        split, _, quantity = key.partition("_")
        if split in ("train", "test", "validation") and quantity:
            tags[f"{quantity}/{split}"] = float(value)
        else:
            tags[key] = float(value)
    return tags


class TensorBoardLogger:
    """``fit`` callback writing each epoch's metrics to TensorBoard.

    :param log_dir: the event folder (``RUN/tensorboard`` from the CLI).
    :param start_epoch: the epoch training resumes after (0 for a new run); events of
        later epochs already in ``log_dir`` are purged.
    """

    def __init__(self, log_dir: str | Path, start_epoch: int = 0) -> None:
        self.log_dir = Path(log_dir)
        self.writer = _writer(self.log_dir, start_epoch + 1 if start_epoch else None)

    def __call__(self, metrics: dict[str, Any]) -> None:
        epoch = int(metrics["epoch"])
        for tag, value in scalar_tags(metrics).items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def log_images(self, vae: PyroModel, images: torch.Tensor, epoch: int, n: int = 16) -> None:
        """Reconstructions (data above, means of p(x|z) below) and prior samples."""
        x = on_model_device(vae, images[:n])
        shape = image_shape(vae, x)
        with torch.no_grad(), forked_rng():
            torch.manual_seed(0)
            reconstruction = reconstruct(vae, x).cpu()
            samples = prior_samples(vae, n, x[:1]).cpu()
        x = x.cpu()
        pairs = torch.cat([x.reshape(-1, *shape), reconstruction.reshape(-1, *shape)])
        self.writer.add_image("reconstructions", _grid(pairs, n), epoch, dataformats="CHW")
        grid = _grid(samples.reshape(-1, *shape), int(n**0.5))
        self.writer.add_image("samples", grid, epoch, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _grid(images: torch.Tensor, per_row: int) -> torch.Tensor:
    from torchvision.utils import make_grid

    grid: torch.Tensor = make_grid(
        images.float().clamp(0, 1).cpu(), nrow=per_row, padding=1, pad_value=1.0
    )
    return grid
