"""Data sets held in memory as tensors, with index batching and binarization.

- ``digits``: scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn), the
  embedded default that works offline.
- ``mnist``, ``fashion-mnist``, ``kmnist``: 28x28, through torchvision (downloaded when
  online) or read from a local folder of IDX files, gzipped or raw. Every file is checked
  (magic number, shape, count, label range; checksums where known) before use.
- your own data: an array or tensor (:meth:`VAEData.from_tensors`, or
  ``load_data(array)``), a ``.npy``/``.npz`` file or a folder of images
  (``load_data(path)``, ``pyro-vae train --data PATH``), checked like the built-in sets.

Images are float32 in [0, 1], flattened to ``(N, C*H*W)``; the shape of one image is
``data_shape``. Binarization: ``dynamic`` draws x ~ Bernoulli(grey level) afresh for
every training batch; ``static`` draws the training set once with a fixed seed; ``none``
keeps grey levels. Evaluation sets of binarized data are drawn once, with a fixed seed,
so that every evaluation of a run sees the same test set.

The built-in sets are read in :mod:`pyro_vae.data.builtin`, your own files in
:mod:`pyro_vae.data.files`.
"""

from __future__ import annotations

import hashlib
import os
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pyro_vae.choices import BINARIZATIONS, DATASETS
from pyro_vae.compat import tensor_version
from pyro_vae.data.builtin import CACHE_ENV as CACHE_ENV
from pyro_vae.data.builtin import digits_splits, mnist_family_splits
from pyro_vae.data.files import as_points, no_labels, read_own
from pyro_vae.errors import DataError


@dataclass
class Split:
    """Images ``(N, D)`` float32 in [0, 1] and labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class VAEData:
    """A data set in memory, ready for training and evaluation.

    ``train.images`` are grey levels (or the static binarization); use :meth:`batches`
    for training batches and :meth:`evaluation_images` for a fixed evaluation set.
    """

    name: str
    data_shape: tuple[int, ...]
    binarize: str
    train: Split
    validation: Split
    test: Split
    seed: int = 0
    #: how to load the data again (the DataConfig fields ``dataset``, ``data_dir``,
    #: ``binarize``, ``validation_size``, ``limit``): written to a run's config.json;
    #: ``None`` for tensors built in memory, which a run folder cannot reload
    source: dict | None = None
    #: checks already passed, by split and model kind (the training checks the data once);
    #: not copied by ``dataclasses.replace``, whose splits may differ
    checked: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _evaluation: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _digests: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def data_dim(self) -> int:
        return int(np.prod(self.data_shape))

    @classmethod
    def from_tensors(
        cls,
        train,
        test=None,
        *,
        name: str = "tensors",
        binarize: str = "none",
        test_size: float = 0.1,
        validation_size: int = 0,
        seed: int = 0,
    ) -> VAEData:
        """Your own data, ``(N, ...)`` arrays or tensors (one data point per row).

        :param train: the training points; with ``test=None``, a seeded ``test_size``
            fraction of them (at least one point) is held out as the test set.
        :param test: the test points, shaped like ``train``'s.
        :param binarize: ``"none"`` (the default: values as they are), or ``"dynamic"``
            / ``"static"`` for values in [0, 1] read as Bernoulli probabilities.
        :param validation_size: training points held out (seeded) for validation.

        Values become float32 (``uint8`` as grey levels, divided by 255) and must be
        finite; the shape of one point is ``data_shape``, and points are stored
        flattened, like the built-in sets.
        """
        _check_choice(binarize, BINARIZATIONS, "binarization")
        images = as_points(train, f"{name} (training points)")
        if test is None:
            if not 0 < test_size < 1:
                raise DataError(f"test_size must be in (0, 1), got {test_size}")
            if len(images) < 2:
                raise DataError(
                    f"{name} has {len(images)} point: hold out a test set needs at least 2"
                )
            count = min(len(images) - 1, max(1, round(test_size * len(images))))
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
            test_images, images = images[order[:count]], images[order[count:]]
        else:
            test_images = as_points(test, f"{name} (test points)")
            if test_images.shape[1:] != images.shape[1:]:
                raise DataError(
                    f"{name}: test points have shape {tuple(test_images.shape[1:])}, training "
                    f"points {tuple(images.shape[1:])}: pass points of one shape"
                )
        shape = tuple(int(d) for d in images.shape[1:])
        train_split = Split(images.reshape(len(images), -1), no_labels(len(images)))
        test_split = Split(test_images.reshape(len(test_images), -1), no_labels(len(test_images)))
        return _assemble(name, shape, binarize, train_split, test_split, validation_size, seed)

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        order: torch.Tensor | None = None,
        first: int = 0,
    ) -> Iterator[torch.Tensor]:
        """One epoch of shuffled training batches (dynamic binarization drawn here).

        ``order``: the epoch's permutation when already drawn (else drawn here from
        ``generator``); ``first``: the batch to start at (a run resumed mid-epoch)."""
        n = len(self.train)
        if order is None:
            order = torch.randperm(n, generator=generator)
        images = self.train.images
        for start in range(first * batch_size, n, batch_size):
            batch = images[order[start : start + batch_size]]
            if self.binarize == "dynamic":
                batch = torch.bernoulli(batch, generator=generator)
            yield batch

    def digests(self) -> dict[str, str]:
        """SHA-256 of each split's images (values, dtype and shape), to tell whether a
        run is resumed or evaluated on the data it was trained on. Kept until a split's
        tensor is replaced or changed in place (its version counter moves)."""
        result = {}
        for split in ("train", "validation", "test"):
            images = getattr(self, split).images
            version = tensor_version(images)
            cached = self._digests.get(split)
            if version is not None and cached is not None and cached[0]() is images:
                if cached[1] == version:
                    result[split] = cached[2]
                    continue
            values = images.detach().cpu().contiguous()
            hasher = hashlib.sha256(f"{values.dtype}{tuple(values.shape)}".encode())
            hasher.update(values.view(-1).view(torch.uint8).numpy().data if values.numel() else b"")
            result[split] = hasher.hexdigest()
            self._digests[split] = (weakref.ref(images), version, result[split])
        return result

    def evaluation_images(self, split: str = "test") -> torch.Tensor:
        """The images of ``split`` as the model should see them when evaluated.

        Binarized data sets are binarized once with a seed fixed by the split name, so
        every evaluation of every run sees the same binary images. The result is kept
        (fit evaluates every epoch); treat it as read-only.
        """
        images = getattr(self, split).images
        if self.binarize == "none" or split == "train" and self.binarize == "static":
            return images
        version = tensor_version(images)
        cached = self._evaluation.get(split)
        if version is not None and cached is not None and cached[0]() is images:
            if cached[1] == version:
                return cached[2]
        generator = torch.Generator().manual_seed(self.seed * 1000 + zlib.crc32(split.encode()))
        binary = torch.bernoulli(images, generator=generator)
        self._evaluation[split] = (weakref.ref(images), version, binary)
        return binary


def load_data(
    name="digits",
    data_dir: str | os.PathLike | None = None,
    binarize: str = "dynamic",
    validation_size: int = 0,
    seed: int = 0,
    limit: int | None = None,
    test_size: float = 0.1,
) -> VAEData:
    """Load a data set by name (see :data:`~pyro_vae.choices.DATASETS`), or your own.

    :param name: a data set's name; or the path of a ``.npy`` file (one array, points in
        rows), a ``.npz`` file (arrays ``train`` and optionally ``test``, or a single
        array) or a folder of images (PNG, JPEG, ...; subfolders ``train`` and ``test``
        where present); or an array or tensor (see :meth:`VAEData.from_tensors`).
    :param data_dir: folder of IDX files for the MNIST family (gz or raw, flat or in
        torchvision's ``<root>/MNIST/raw`` layout). Without it, the files are looked up
        in ``$PYRO_VAE_DATA`` (default ``~/.cache/pyro-vae``) and downloaded there
        through torchvision if absent.
    :param binarize: ``dynamic``, ``static`` or ``none``.
    :param validation_size: training points held out (fixed seed) as a validation set.
    :param limit: keep only the first ``limit`` training and test points (quick runs).
    :param test_size: for your own data without a test set: the fraction held out.
    """
    _check_choice(binarize, BINARIZATIONS, "binarization")
    _check_count(validation_size, "validation_size", minimum=0)
    _check_count(seed, "seed", minimum=0)
    if limit is not None:
        _check_count(limit, "limit", minimum=1)
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise DataError(f"test_size must be a number in (0, 1), got {test_size!r}")
    if not isinstance(name, (str, os.PathLike)):
        return VAEData.from_tensors(
            name,
            name="array",
            binarize=binarize,
            test_size=test_size,
            validation_size=validation_size,
            seed=seed,
        )
    source = {
        "dataset": str(name),
        "data_dir": None if data_dir is None else str(data_dir),
        "binarize": binarize,
        "validation_size": validation_size,
        "limit": limit,
    }
    if isinstance(name, str) and name in DATASETS:
        named = digits_splits(seed) if name == "digits" else mnist_family_splits(name, data_dir)
        (train_images, train_labels), (test_images, test_labels), shape = named
        train, test = Split(train_images, train_labels), Split(test_images, test_labels)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(
                f"unknown dataset {str(name)!r}: choose one of {', '.join(DATASETS)}, or "
                f"pass the path of a .npy/.npz file or a folder of images (no such file)"
            )
        own = VAEData.from_tensors(
            *read_own(path), name=str(path), binarize=binarize, test_size=test_size, seed=seed
        )
        train, test, shape = own.train, own.test, own.data_shape
        source["dataset"] = str(path.resolve())
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        train = Split(train.images[:limit], train.labels[:limit])
        test = Split(test.images[:limit], test.labels[:limit])
    data = _assemble(str(name), shape, binarize, train, test, validation_size, seed)
    data.source = source
    return data


def _check_count(value, what: str, minimum: int) -> None:
    """``value`` is a whole number (not a bool, not 2.5) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{what} must be a whole number >= {minimum}, got {value!r}")
    if value < minimum:
        raise DataError(f"{what} must be >= {minimum}, got {value}")


def _check_choice(value, choices, what: str) -> None:
    if value not in choices:
        raise DataError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


def _assemble(name, shape, binarize, train: Split, test: Split, validation_size, seed) -> VAEData:
    """Hold out the validation set, binarize statically if asked, check the values."""
    if binarize != "none":
        for split, what in ((train, "training"), (test, "test")):
            if len(split) and (split.images.min() < 0 or split.images.max() > 1):
                raise DataError(
                    f"{name}: {what} values span [{float(split.images.min()):g}, "
                    f"{float(split.images.max()):g}], but binarize={binarize!r} reads them as "
                    f"probabilities in [0, 1]: scale them, or use binarize='none' (with a "
                    f"gaussian likelihood for unbounded values)"
                )
    if not 0 <= validation_size < len(train):
        raise DataError(
            f"validation size {validation_size} must be in [0, {len(train) - 1}] for "
            f"{len(train)} training images"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held_out, kept = order[:validation_size], order[validation_size:]
    if validation_size:
        validation = Split(train.images[held_out], train.labels[held_out])
        train = Split(train.images[kept], train.labels[kept])
    else:
        validation = Split(train.images[:0], train.labels[:0])
    if binarize == "static":
        generator = torch.Generator().manual_seed(seed)
        train = Split(torch.bernoulli(train.images, generator=generator), train.labels)
    return VAEData(name, shape, binarize, train, validation, test, seed)


def data_shape_of(dataset: str) -> tuple[int, ...]:
    """The shape of one point of ``dataset`` (a name or a path), without loading it all."""
    if dataset == "digits":
        return (1, 8, 8)
    if dataset in DATASETS:
        return (1, 28, 28)
    path = Path(dataset)
    if path.suffix == ".npy" and path.is_file():
        return tuple(int(d) for d in np.load(path, mmap_mode="r", allow_pickle=False).shape[1:])
    train, _ = read_own(path)
    return tuple(int(d) for d in train.shape[1:])
