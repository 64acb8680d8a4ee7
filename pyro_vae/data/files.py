"""Your own data: a ``.npy``/``.npz`` file or a folder of images, read and checked.

Every path is checked to be a regular file before it is opened (a FIFO would hang the
read), a ``.npy`` header against the file's size, every image's size before it is
decoded (:data:`MAX_IMAGE_PIXELS`); values become float32 points of finite numbers
(:func:`as_points`). :func:`~pyro_vae.data.load_data` and
:meth:`~pyro_vae.data.VAEData.from_tensors` read them through this module.
"""

from __future__ import annotations

import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy

from pyro_vae.errors import DataError

#: image files read from a folder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def no_labels(n: int) -> torch.Tensor:
    return torch.full((n,), -1, dtype=torch.int64)


def as_points(values, what: str) -> torch.Tensor:
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


def read_own(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, test or None) from a .npy file, a .npz file or a folder of images."""
    if path.is_dir():
        parts = [path / "train", path / "test"]
        if parts[0].is_dir():
            test = read_images(parts[1]) if parts[1].is_dir() else None
            return read_images(parts[0]), test
        return read_images(path), None
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


def read_images(folder: Path) -> np.ndarray:
    """The images of ``folder`` (sorted by name) as ``(N, C, H, W)`` grey levels in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): pass a folder of images"
        )
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


def _check_regular(path: Path) -> None:
    """Refuse, before opening it, a path that is not a regular file (a FIFO would hang
    the read, a device would never end)."""
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
