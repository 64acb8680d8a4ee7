"""The built-in data sets: scikit-learn's 8x8 digits and the MNIST family.

``mnist``, ``fashion-mnist`` and ``kmnist`` are read from a folder of IDX files, gzipped
or raw (flat, or in torchvision's ``<root>/<Class>/raw`` layout), downloaded through
torchvision into ``$PYRO_VAE_DATA`` (:data:`CACHE_ENV`) when no folder is given. Every
file is checked (magic number, shape, count, label range; MD5 for MNIST) before use.
Each loader returns ``(train, test, shape)``, a split being ``(images, labels)``: images
``(N, D)`` float32 in [0, 1], labels ``(N,)`` int64.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from pyro_vae.errors import DataError

#: one split: images ``(N, D)`` and labels ``(N,)``
Pair = tuple[torch.Tensor, torch.Tensor]

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


def digits_splits(seed: int) -> tuple[Pair, Pair, tuple[int, ...]]:
    """scikit-learn's digits, split 1,500 / 297 by a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    # A fixed split (independent of the run's seed): 1,500 training, 297 test images.
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(20240601))
    train_idx, test_idx = order[:1500], order[1500:]
    return (
        (images[train_idx], labels[train_idx]),
        (images[test_idx], labels[test_idx]),
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


def mnist_family_splits(name: str, data_dir) -> tuple[Pair, Pair, tuple[int, ...]]:
    """``name``'s four IDX files from ``data_dir`` (else the cache, downloaded there when
    absent), checked."""
    fix = "or use `dataset='digits'` (offline, built in)"
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.exists():
            raise DataError(
                f"data folder {folder} does not exist: pass `data_dir`, the folder "
                f"holding {name}'s IDX files ({_IDX_FILES['train_images']}[.gz], ...), {fix}"
            )
        if not folder.is_dir():
            raise DataError(f"`data_dir` {folder} is a file, not a folder of IDX files")
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
    # (none is missing here)
    arrays = {key: _read_idx(name, path) for key, path in paths.items() if path is not None}
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
        splits[split] = (
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
            f" {str(error).splitlines()[0] if str(error) else 'no network?'}): pass `data_dir`, "
            f"a folder of IDX files (gz or raw), or use `dataset='digits'`"
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
