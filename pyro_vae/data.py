"""Data sets held in memory as tensors, with index batching and binarization.

- ``digits``: scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn), the
  embedded default that works offline.
- ``mnist``, ``fashion-mnist``, ``kmnist``: 28x28, through torchvision (downloaded when
  online) or read from a local folder of IDX files, gzipped or raw. Every file is checked
  (magic number, shape, count, label range; checksums where known) before use.

Images are float32 in [0, 1], flattened to ``(N, C*H*W)``; the shape of one image is
``data_shape``. Binarization: ``dynamic`` draws x ~ Bernoulli(grey level) afresh for
every training batch; ``static`` draws the training set once with a fixed seed; ``none``
keeps grey levels. Evaluation sets of binarized data are drawn once, with a fixed seed,
so that every evaluation of a run sees the same test set.
"""

from __future__ import annotations

import gzip
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
from pyro_vae.errors import DataError

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_COUNTS = {"train": 60000, "test": 10000}
# MD5 of the uncompressed MNIST files (the official distribution).
_MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
#: Environment variable naming a folder for downloads (default ~/.cache/pyro-vae).
CACHE_ENV = "PYRO_VAE_DATA"


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
    #: checks already passed, by split and model kind (see ``training.check_data_once``);
    #: not copied by ``dataclasses.replace``, whose splits may differ
    checked: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _evaluation: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def data_dim(self) -> int:
        return int(np.prod(self.data_shape))

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[torch.Tensor]:
        """One epoch of shuffled training batches (dynamic binarization drawn here)."""
        n = len(self.train)
        order = torch.randperm(n, generator=generator)
        images = self.train.images
        for start in range(0, n, batch_size):
            batch = images[order[start : start + batch_size]]
            if self.binarize == "dynamic":
                batch = torch.bernoulli(batch, generator=generator)
            yield batch

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
    name: str = "digits",
    data_dir: str | os.PathLike | None = None,
    binarize: str = "dynamic",
    validation_size: int = 0,
    seed: int = 0,
    limit: int | None = None,
) -> VAEData:
    """Load a data set by name (see :data:`DATASETS`).

    Args:
        data_dir: folder of IDX files for the MNIST family (gz or raw, flat or in
            torchvision's ``<root>/MNIST/raw`` layout). Without it, the files are looked
            up in ``$PYRO_VAE_DATA`` (default ``~/.cache/pyro-vae``) and downloaded there
            through torchvision if absent.
        binarize: ``dynamic``, ``static`` or ``none``.
        validation_size: training points held out (fixed seed) as a validation set.
        limit: keep only the first ``limit`` training and test points (for quick runs).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if binarize not in BINARIZATIONS:
        raise DataError(
            f"unknown binarization {binarize!r}: choose one of {', '.join(BINARIZATIONS)}"
        )
    if name == "digits":
        train, test, shape = _load_digits(seed)
    else:
        train, test, shape = _load_mnist_family(name, data_dir)
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        train = Split(train.images[:limit], train.labels[:limit])
        test = Split(test.images[:limit], test.labels[:limit])
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


# ------------------------------------------------------------------------- digits
def _load_digits(seed: int) -> tuple[Split, Split, tuple[int, ...]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    # A fixed split (independent of the run's seed): 1,500 training, 297 test images.
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(20240601))
    train_idx, test_idx = order[:1500], order[1500:]
    return (
        Split(images[train_idx], labels[train_idx]),
        Split(images[test_idx], labels[test_idx]),
        (1, 8, 8),
    )


# ------------------------------------------------------------------------- MNIST family
def _default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pyro-vae")


def _find_idx(folder: Path, name: str, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in the folder or in torchvision's ``<folder>/<Class>/raw``."""
    for base in (folder, folder / _TORCHVISION_CLASS[name] / "raw"):
        for candidate in (base / stem, base / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_mnist_family(name: str, data_dir) -> tuple[Split, Split, tuple[int, ...]]:
    fix = "or use --dataset digits (offline, built in)"
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.exists():
            raise DataError(
                f"data folder {folder} does not exist: pass --data-dir with the folder "
                f"holding {name}'s IDX files ({_IDX_FILES['train_images']}[.gz], ...), {fix}"
            )
        if not folder.is_dir():
            raise DataError(f"--data-dir {folder} is a file, not a folder of IDX files")
    else:
        folder = _default_cache()
    paths = {key: _find_idx(folder, name, stem) for key, stem in _IDX_FILES.items()}
    missing = [_IDX_FILES[key] for key, path in paths.items() if path is None]
    if missing and data_dir is None:
        _download(name, folder)
        paths = {key: _find_idx(folder, name, stem) for key, stem in _IDX_FILES.items()}
        missing = [_IDX_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise DataError(
            f"{name} files missing in {folder}: {', '.join(missing)} (raw or .gz): "
            f"put all four IDX files there, {fix}"
        )
    arrays = {key: _read_idx(name, path) for key, path in paths.items()}
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(
                f"{paths[f'{split}_images']} holds images of shape {images.shape[1:]}, not "
                f"28x28: is it an IDX image file of {name}? Replace it with the original file"
            )
        if labels.ndim != 1:
            raise DataError(f"{paths[f'{split}_labels']} is not an IDX label file: replace it")
        if len(images) != _COUNTS[split] or len(labels) != _COUNTS[split]:
            raise DataError(
                f"{name} {split} files hold {len(images)} images and {len(labels)} labels, "
                f"expected {_COUNTS[split]} of each: replace the files with the originals"
            )
        if labels.max() > 9:
            raise DataError(f"{paths[f'{split}_labels']} has labels above 9: replace the file")
        splits[split] = Split(
            torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0),
            torch.from_numpy(labels.astype(np.int64)),
        )
    return splits["train"], splits["test"], (1, 28, 28)


def _download(name: str, folder: Path) -> None:
    import torchvision

    dataset_class = getattr(torchvision.datasets, _TORCHVISION_CLASS[name])
    try:
        for train in (True, False):
            dataset_class(str(folder), train=train, download=True)
    except Exception as error:  # torchvision raises URLError, RuntimeError, ...
        raise DataError(
            f"{name} not found in {folder} and could not be downloaded ({type(error).__name__}:"
            f" {str(error).splitlines()[0] if str(error) else 'no network?'}): pass --data-dir "
            f"with a folder of IDX files (gz or raw), or use --dataset digits"
        ) from None


def _read_idx(name: str, path: Path) -> np.ndarray:
    """Read and check one IDX file (gz or raw): magic number, size, checksum."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(
            f"{path} is corrupt or truncated ({error}): download it again or replace it"
        ) from None
    # Checksums of the uncompressed content, so that a recompressed .gz still verifies.
    # Known for MNIST; Fashion-MNIST and KMNIST publish only .gz checksums, so their
    # files get the structural checks below alone.
    expected = _MNIST_MD5.get(path.name.removesuffix(".gz")) if name == "mnist" else None
    if expected is not None:
        md5 = hashlib.md5(raw).hexdigest()
        if md5 != expected:
            raise DataError(
                f"checksum mismatch for {path}: md5 of its content is {md5}, expected "
                f"{expected}: the file is corrupt or not the original; replace it"
            )
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number): replace it")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (incomplete header): download it again")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_size = header + int(np.prod(dims))
    if len(raw) != expected_size:
        raise DataError(
            f"{path} is truncated or padded: {len(raw)} bytes, expected {expected_size} for "
            f"shape {dims}: download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
