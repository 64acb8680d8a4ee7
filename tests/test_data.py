"""Data sets: the built-in digits, MNIST from IDX files, and every way a file can be bad."""

from __future__ import annotations

import gzip
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from pyro_vae.data import load_data
from pyro_vae.errors import DataError

# From ../shared/data/mnist/README.md (train / test per class)
MNIST_CLASS_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}


# ----------------------------------------------------------------------- digits
def test_digits_offline_shapes_and_range():
    data = load_data("digits")
    assert data.data_shape == (1, 8, 8) and data.data_dim == 64
    assert len(data.train) == 1500 and len(data.test) == 297 and len(data.validation) == 0
    assert data.train.images.dtype == torch.float32
    assert data.train.images.min() >= 0 and data.train.images.max() <= 1
    assert set(data.train.labels.unique().tolist()) == set(range(10))


def test_dynamic_binarization_draws_fresh_bits_every_epoch():
    data = load_data("digits", binarize="dynamic")
    generator = torch.Generator().manual_seed(0)
    first = torch.cat(list(data.batches(100, generator)))
    second = torch.cat(list(data.batches(100, generator)))
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert first.shape == (1500, 64)
    # the same images (in another order) but different bits
    assert first.sum() != second.sum()
    # fixed evaluation set: the same bits every call
    torch.testing.assert_close(data.evaluation_images(), data.evaluation_images())
    assert set(data.evaluation_images().unique().tolist()) <= {0.0, 1.0}


def test_static_binarization_is_fixed():
    a, b = load_data("digits", binarize="static"), load_data("digits", binarize="static")
    torch.testing.assert_close(a.train.images, b.train.images)
    assert set(a.train.images.unique().tolist()) == {0.0, 1.0}
    batch = next(a.batches(1500, torch.Generator().manual_seed(0)))
    assert set(batch.unique().tolist()) == {0.0, 1.0}


def test_no_binarization_keeps_grey_levels():
    data = load_data("digits", binarize="none")
    assert len(data.train.images.unique()) == 17  # 0/16 ... 16/16
    torch.testing.assert_close(data.evaluation_images(), data.test.images)


def test_validation_split_and_limit():
    data = load_data("digits", validation_size=200, limit=1000)
    assert len(data.train) == 800 and len(data.validation) == 200 and len(data.test) == 297
    seen = torch.cat([data.train.images, data.validation.images])
    assert (
        torch.unique(seen, dim=0).shape[0]
        == torch.unique(load_data("digits", limit=1000).train.images, dim=0).shape[0]
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"name": "cifar"}, "unknown dataset 'cifar'"),
        ({"binarize": "maybe"}, "unknown binarization 'maybe'"),
        ({"validation_size": 1500}, "validation size 1500"),
        ({"limit": 0}, "limit must be >= 1"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_data(**{"name": "digits", **kwargs})


# ----------------------------------------------------------------------- MNIST
def test_mnist_from_a_local_idx_folder(mnist_dir):
    data = load_data("mnist", mnist_dir, binarize="none")
    assert data.data_shape == (1, 28, 28)
    assert data.train.images.shape == (60000, 784) and data.test.images.shape == (10000, 784)
    for split in ("train", "test"):
        counts = getattr(data, split).labels.bincount().tolist()
        assert counts == MNIST_CLASS_COUNTS[split]


def test_mnist_in_torchvision_layout_and_raw_files(mnist_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in Path(mnist_dir).glob("*-ubyte.gz"):
        (raw / path.name.removesuffix(".gz")).write_bytes(gzip.decompress(path.read_bytes()))
    data = load_data("mnist", tmp_path, limit=10)
    assert data.train.images.shape == (10, 784)


@pytest.fixture
def mnist_copy(mnist_dir, tmp_path) -> Path:
    folder = tmp_path / "mnist"
    shutil.copytree(mnist_dir, folder)
    return folder


def test_truncated_gzip_is_reported(mnist_copy):
    path = mnist_copy / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is corrupt or truncated"):
        load_data("mnist", mnist_copy)


def test_checksum_mismatch_is_reported(mnist_copy):
    gz = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(gz.read_bytes()))
    content[100] = (content[100] + 1) % 10  # still a valid label: only the checksum knows
    gz.unlink()
    (mnist_copy / "t10k-labels-idx1-ubyte").write_bytes(bytes(content))
    with pytest.raises(DataError, match="checksum mismatch for .*t10k-labels-idx1-ubyte"):
        load_data("mnist", mnist_copy)


def test_missing_file_is_named(mnist_copy):
    (mnist_copy / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="files missing .*: t10k-labels-idx1-ubyte"):
        load_data("mnist", mnist_copy)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(
        DataError, match="does not exist: pass `data_dir`, .* or use `dataset=.digits.`"
    ):
        load_data("mnist", tmp_path / "nowhere")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_data("mnist", a_file)


def _idx(dims: tuple[int, ...], fill: int = 0) -> bytes:
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    count = 1
    for d in dims:
        count *= d
    return header + bytes([fill]) * count


def _fake_folder(folder: Path, train: int = 60000, test: int = 10000) -> Path:
    folder.mkdir()
    (folder / "train-images-idx3-ubyte").write_bytes(_idx((train, 28, 28)))
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx((train,), 3))
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx((test, 28, 28)))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx((test,), 3))
    return folder


def test_structural_checks_without_checksums(tmp_path):
    # Fashion-MNIST publishes no checksum of its raw files: structure is all we check
    good = _fake_folder(tmp_path / "good")
    assert len(load_data("fashion-mnist", good, limit=5).train) == 5

    short = _fake_folder(tmp_path / "short", train=500)
    with pytest.raises(DataError, match="hold 500 images and 500 labels, expected 60000"):
        load_data("fashion-mnist", short)

    truncated = _fake_folder(tmp_path / "truncated")
    path = truncated / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is truncated or padded"):
        load_data("kmnist", truncated)

    magic = _fake_folder(tmp_path / "magic")
    (magic / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(DataError, match="bad magic number"):
        load_data("fashion-mnist", magic)

    swapped = _fake_folder(tmp_path / "swapped")
    (swapped / "train-images-idx3-ubyte").write_bytes(_idx((60000, 14, 56)))
    with pytest.raises(DataError, match="not 28x28"):
        load_data("fashion-mnist", swapped)


def test_no_network_gives_the_fix(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "KMNIST", offline)
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path))
    with pytest.raises(DataError, match="could not be downloaded .* pass `data_dir`"):
        load_data("kmnist")
