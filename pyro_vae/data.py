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
    #: how to load the data again (the DataConfig fields ``dataset``, ``data_dir``,
    #: ``binarize``, ``validation_size``, ``limit``): written to a run's config.json;
    #: ``None`` for tensors built in memory, which a run folder cannot reload
    source: dict | None = None
    #: checks already passed, by split and model kind (see ``training.check_data_once``);
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
        images = _as_points(train, f"{name} (training points)")
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
            test_images = _as_points(test, f"{name} (test points)")
            if test_images.shape[1:] != images.shape[1:]:
                raise DataError(
                    f"{name}: test points have shape {tuple(test_images.shape[1:])}, training "
                    f"points {tuple(images.shape[1:])}: pass points of one shape"
                )
        shape = tuple(int(d) for d in images.shape[1:])
        train_split = Split(images.reshape(len(images), -1), _no_labels(len(images)))
        test_split = Split(test_images.reshape(len(test_images), -1), _no_labels(len(test_images)))
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
        if name == "digits":
            train, test, shape = _load_digits(seed)
        else:
            train, test, shape = _load_mnist_family(name, data_dir)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(
                f"unknown dataset {str(name)!r}: choose one of {', '.join(DATASETS)}, or "
                f"pass the path of a .npy/.npz file or a folder of images (no such file)"
            )
        own = VAEData.from_tensors(
            *_read_own(path), name=str(path), binarize=binarize, test_size=test_size, seed=seed
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


def _check_regular(path: Path) -> None:
    """Refuse, before opening it, a path that is not a regular file (a FIFO would hang
    the read, a device would never end)."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror}): check the path") from None
    if not stat.S_ISREG(mode):
        raise DataError(
            f"{path} is not a regular file (a pipe, socket or device): pass a .npy/.npz file "
            f"or a folder of images"
        )


def _check_npy_header(path: Path) -> None:
    """Refuse a ``.npy`` file whose header claims more bytes than the file holds (a
    truncated or crafted file: numpy would try to allocate what the header claims)."""
    from numpy.lib import format as npy

    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            version = npy.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = npy.read_array_header_1_0(handle)
            else:
                shape, _, dtype = npy.read_array_header_2_0(handle)
            offset = handle.tell()
    except (OSError, ValueError, EOFError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path} cannot be read as a numpy file ({first}): replace it") from None
    if dtype.hasobject:
        return  # (np.load refuses it: allow_pickle=False)
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if offset + claimed != size:
        raise DataError(
            f"{path}: its header describes an array of shape {tuple(shape)} ({claimed:,} "
            f"bytes of {dtype}) but the file holds {size - offset:,} bytes of data: the file "
            f"is truncated or not what it claims; replace it"
        )


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


# ------------------------------------------------------------------------- your own data
#: image files read from a folder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _no_labels(n: int) -> torch.Tensor:
    return torch.full((n,), -1, dtype=torch.int64)


def _as_points(values, what: str) -> torch.Tensor:
    """``values`` as a float32 tensor ``(N, ...)`` of finite numbers, or one line why not."""
    try:
        array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    except Exception as error:  # ragged lists, objects, ...
        raise DataError(f"{what} is not an array of numbers ({error})") from None
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype.kind not in "biuf":
        raise DataError(f"{what} holds {array.dtype} values, not numbers: pass a numeric array")
    if array.ndim < 2 or array.shape[0] < 1 or array[0].size < 1:
        raise DataError(
            f"{what} has shape {array.shape}: pass one point per row, (N, D) or (N, C, H, W)"
        )
    tensor = torch.as_tensor(array.astype(np.float32, copy=False))
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).flatten(1).any(1).sum())
        raise DataError(f"{what}: {bad} point(s) hold NaN or infinite values: clean or drop them")
    return tensor


def _read_own(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, test or None) from a .npy file, a .npz file or a folder of images."""
    if path.is_dir():
        parts = [path / "train", path / "test"]
        if parts[0].is_dir():
            test = _read_images(parts[1]) if parts[1].is_dir() else None
            return _read_images(parts[0]), test
        return _read_images(path), None
    _check_regular(path)
    try:
        if path.suffix == ".npy":
            _check_npy_header(path)
            return np.load(path, allow_pickle=False), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                keys = list(arrays.keys())
                if "train" in keys:
                    return arrays["train"], arrays["test"] if "test" in keys else None
                if len(keys) == 1:
                    return arrays[keys[0]], None
                raise DataError(
                    f"{path} holds arrays {', '.join(keys)}: name them train (and test), or "
                    f"save a single array"
                )
    except (OSError, ValueError, EOFError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path} cannot be read as a numpy file ({first}): replace it") from None
    raise DataError(
        f"{path} is a {path.suffix or 'suffix-less'} file: pass a .npy or .npz file, or a "
        f"folder of images"
    )


def _read_images(folder: Path) -> np.ndarray:
    """The images of ``folder`` (sorted by name) as ``(N, C, H, W)`` grey levels in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): pass a folder of images"
        )
    import warnings

    arrays = []
    for file in files:
        _check_regular(file)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as image:  # (reads the header only)
                    width, height = image.size
                    if width * height > MAX_IMAGE_PIXELS:
                        raise DataError(
                            f"{file} is {width}x{height} pixels, more than the "
                            f"{MAX_IMAGE_PIXELS:,} an image may have here (a decompression "
                            f"bomb, or not a training image): remove it, or resize it"
                        )
                    array = _grey_levels(image)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"{file} is not a readable image ({error}): remove it") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise DataError(
                f"{file} is refused as a decompression bomb ({error}): remove it, or resize it"
            ) from None
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        sizes = ", ".join(map(str, sorted(shapes)[:3]))
        raise DataError(f"{folder} holds images of {len(shapes)} sizes ({sizes}): resize them")
    return np.stack(arrays)


#: the most pixels one image of a folder may have (64 megapixels: far above any image a
#: VAE here trains on; a header claiming more is refused before anything is decoded)
MAX_IMAGE_PIXELS = 1 << 26


def _grey_levels(image) -> np.ndarray:
    """An opened image as float32 levels in [0, 1], scaled by its bit depth: 8-bit
    images by 255, 16-bit ones (PNG, TIFF: modes ``I;16*``, and ``I`` as Pillow opens a
    16-bit PNG) by 65535, never clipped to 8 bits first."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode == "I":
        raise DataError(
            f"{image.filename} holds 32-bit integer pixels, which have no scale to grey "
            f"levels: save it as an 8- or 16-bit image"
        )
    mode = "L" if image.mode in ("1", "L", "F", "P") else "RGB"
    return np.asarray(image.convert(mode), dtype=np.float32) / 255.0


def data_shape_of(dataset: str) -> tuple[int, ...]:
    """The shape of one point of ``dataset`` (a name or a path), without loading it all."""
    if dataset == "digits":
        return (1, 8, 8)
    if dataset in DATASETS:
        return (1, 28, 28)
    path = Path(dataset)
    if path.suffix == ".npy" and path.is_file():
        return tuple(int(d) for d in np.load(path, mmap_mode="r", allow_pickle=False).shape[1:])
    train, _ = _read_own(path)
    return tuple(int(d) for d in train.shape[1:])


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
