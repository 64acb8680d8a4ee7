"""End-to-end reference results: a change that moves a trained number beyond the seed
spread fails here.

``tests/reference/estimators.json`` holds, per estimator of the registry, the test ELBO,
its KL and log p(x) of a short digits run from five seeds, with a band of mean +- max(4
standard deviations, 0.5 nats) over the seeds (made, and remade after an intended
change, by ``python benchmarks/reference_runs.py``). Each test trains one of those seeds
again and asserts that every number is inside its band. With the double-scaled STL/DReG
path term put back, stl's test ELBO leaves its band by tens of nats.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from pyro_vae.objectives.registry import ESTIMATORS

from .conftest import REPO

REFERENCE = json.loads((REPO / "tests" / "reference" / "estimators.json").read_text())


def _reference_runs():
    spec = importlib.util.spec_from_file_location(
        "reference_runs", REPO / "benchmarks" / "reference_runs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reference_runs", module)  # (its dataclass looks itself up there)
    spec.loader.exec_module(module)
    return module


def _outside(metrics, bands) -> dict:
    """The metrics outside their bands: name -> (value, low, high)."""
    return {
        name: (value, bands[name]["low"], bands[name]["high"])
        for name, value in metrics.items()
        if not bands[name]["low"] <= value <= bands[name]["high"]
    }


def test_every_registered_estimator_has_reference_results():
    # a new estimator gets its reference numbers (run benchmarks/reference_runs.py)
    assert set(REFERENCE["estimators"]) == set(ESTIMATORS)


@pytest.mark.parametrize("estimator", sorted(REFERENCE["estimators"]))
def test_trained_numbers_stay_in_their_seed_band(estimator):
    runs = _reference_runs()
    run = runs.train_once(estimator, REFERENCE["check_seed"], REFERENCE["settings"])
    outside = _outside(run.metrics, REFERENCE["estimators"][estimator])
    assert not outside, f"{estimator}: outside the seed band (value, low, high): {outside}"


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["mc", "iwae", "stl", "dreg"])
def test_a_short_mnist_run_stays_in_its_golden_band(estimator, mnist_dir):
    # the IWAE paper's network, 3 epochs on 10,000 MNIST images (tests/reference/mnist.json,
    # made by `python benchmarks/reference_runs.py --mnist DIR`); `pytest -m slow`
    reference = json.loads((REPO / "tests" / "reference" / "mnist.json").read_text())
    runs = _reference_runs()
    run = runs.train_once(estimator, reference["check_seed"], reference["settings"], mnist_dir)
    outside = _outside(run.metrics, reference["estimators"][estimator])
    assert not outside, f"{estimator} on MNIST: outside the golden band: {outside}"
