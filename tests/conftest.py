"""Every test starts with an empty param store, Pyro validation on and fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: Environment variable naming the folder of MNIST IDX files (.ci/run sets it).
MNIST_ENV = "PYRO_VAE_MNIST_DIR"


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """MNIST IDX files: $PYRO_VAE_MNIST_DIR, else ../shared/data/mnist beside the repo."""
    candidate = os.environ.get(MNIST_ENV) or REPO.parent / "shared" / "data" / "mnist"
    path = Path(candidate)
    if (
        not (path / "train-images-idx3-ubyte.gz").exists()
        and not (path / "train-images-idx3-ubyte").exists()
    ):
        pytest.skip(f"MNIST IDX files not found: set {MNIST_ENV} to their folder")
    return path
