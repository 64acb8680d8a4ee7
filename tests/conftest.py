"""Every test starts with an empty param store, Pyro validation on, fixed seeds and the
session's torch thread count.

``PYRO_VAE_TEST_THREADS=N`` runs the suite with N torch intra-op threads, here and in
every process it starts (through ``OMP_NUM_THREADS``, which torch reads at start-up;
torchrun workers and Ray tasks set their own). Unset: torch's default, as a user gets.
Running the suite once with 1 and once with 2 shows a test that only passes where the
kernels happen not to split the work over threads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: Environment variable naming the folder of MNIST IDX files (.ci/run sets it).
MNIST_ENV = "PYRO_VAE_MNIST_DIR"
#: Environment variable: the torch threads of the tests (unset: torch's default).
THREADS_ENV = "PYRO_VAE_TEST_THREADS"


#: the torch threads every test starts with, so that a test which changes them cannot
#: leak its count into the next (set once the session is configured)
THREADS = torch.get_num_threads()


def pytest_configure(config: pytest.Config) -> None:
    global THREADS
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise pytest.UsageError(f"{THREADS_ENV} must be an integer >= 1, got {value!r}")
        os.environ["OMP_NUM_THREADS"] = value  # the CLI processes the tests start
        torch.set_num_threads(int(value))
    THREADS = torch.get_num_threads()


def pytest_report_header() -> str:
    return (
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"torch threads {THREADS} ({THREADS_ENV}={os.environ.get(THREADS_ENV, 'unset')})"
    )


@pytest.fixture(autouse=True)
def fresh_pyro():
    torch.set_num_threads(THREADS)
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


@pytest.fixture(autouse=True)
def _registry_as_collected():
    """Registrations are per process: one a test makes (register_estimator, or compare
    registering an object without an import path) is taken back after it, so that no
    later test sees another test's estimator."""
    from pyro_vae.objectives.registry import ESTIMATORS

    before = dict(ESTIMATORS)
    yield
    if ESTIMATORS != before:
        ESTIMATORS.clear()
        ESTIMATORS.update(before)
