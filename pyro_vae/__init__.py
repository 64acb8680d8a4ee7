"""pyro-vae: the variational autoencoder as a Pyro program, with an objective you can see.

Conventions: every ELBO and log-likelihood is in nats per data point, higher is better;
the quantity minimised is ``loss = -elbo``; an ELBO is reported with its two terms,
``elbo = expected_log_likelihood - kl``.

The package is layered; each layer imports only the ones below it (checked in CI):

- :mod:`pyro_vae.app`: the command line, run folders, reports, plots, sweeps
- :mod:`pyro_vae.training`: ``fit``, the trainer, schedules, checkpoints
- :mod:`pyro_vae.config`: the run configuration (dataclasses read by CLI and library)
- :mod:`pyro_vae.analysis`: evaluation, gradient statistics, bounds, diagnostics
- :mod:`pyro_vae.objectives`: the estimators (ELBOs), their registry, the captured step
- :mod:`pyro_vae.models`: the Pyro programs, the model protocol, networks, likelihoods
- :mod:`pyro_vae.data`: data sets
- :mod:`pyro_vae.errors`, :mod:`pyro_vae.compat`, :mod:`pyro_vae.io`,
  :mod:`pyro_vae.resources`: the base

The public names below are imported on first use (``import pyro_vae`` stays cheap, so
the command line answers bad input at once); type checkers and IDEs see them through
the ``TYPE_CHECKING`` imports, which a test keeps equal to the table.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    # models
    "VAE": "pyro_vae.models.vae",
    "HierarchicalVAE": "pyro_vae.models.hierarchical",
    "build_vae": "pyro_vae.models.build",
    "LATENT_SITE": "pyro_vae.models.vae",
    "OBSERVED_SITE": "pyro_vae.models.vae",
    "DATA_PLATE": "pyro_vae.models.vae",
    "ModelSites": "pyro_vae.models.protocol",
    "PyroModel": "pyro_vae.models.protocol",
    "model_sites": "pyro_vae.models.protocol",
    # objectives
    "gaussian_kl": "pyro_vae.models.kl",
    "make_elbo": "pyro_vae.objectives.registry",
    "ESTIMATORS": "pyro_vae.objectives.registry",
    "Estimator": "pyro_vae.objectives.spec",
    "Option": "pyro_vae.objectives.options",
    "register_estimator": "pyro_vae.objectives.registry",
    "estimator_spec": "pyro_vae.objectives.registry",
    "ImportanceWeightedELBO": "pyro_vae.objectives.importance",
    "elbo_terms": "pyro_vae.objectives.terms",
    "ElboTerms": "pyro_vae.objectives.terms",
    "tutorial_loss": "pyro_vae.objectives.terms",
    "log_importance_weights": "pyro_vae.objectives.terms",
    # analysis
    "log_likelihood": "pyro_vae.analysis.evaluation",
    "ais_log_likelihood": "pyro_vae.analysis.ais",
    "bdmc": "pyro_vae.analysis.ais",
    "AISResult": "pyro_vae.analysis.ais",
    "BDMCResult": "pyro_vae.analysis.ais",
    "evaluate": "pyro_vae.analysis.evaluation",
    "Evaluation": "pyro_vae.analysis.evaluation",
    "evaluate_elbo": "pyro_vae.analysis.evaluation",
    "active_units": "pyro_vae.analysis.units",
    "estimator_gradient_statistics": "pyro_vae.analysis.gradients",
    "bound_tightness": "pyro_vae.analysis.bounds",
    # data and configuration
    "load_data": "pyro_vae.data",
    "VAEData": "pyro_vae.data",
    "ModelConfig": "pyro_vae.config",
    "DataConfig": "pyro_vae.config",
    "TrainConfig": "pyro_vae.config",
    "RunConfig": "pyro_vae.config",
    # training
    "fit": "pyro_vae.training.fit",
    "History": "pyro_vae.training.trainer",
    # application
    "load_run": "pyro_vae.app.runs",
    "compare_estimators": "pyro_vae.app.compare",
    "diagnose": "pyro_vae.app.diagnose",
}

#: subpackages and modules reachable as attributes (``pyro_vae.models.exact``)
_MODULES = (
    "app",
    "analysis",
    "choices",
    "config",
    "data",
    "distributed",
    "models",
    "objectives",
    "training",
)

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from pyro_vae.analysis.ais import AISResult, BDMCResult, ais_log_likelihood, bdmc
    from pyro_vae.analysis.bounds import bound_tightness
    from pyro_vae.analysis.evaluation import Evaluation, evaluate, evaluate_elbo, log_likelihood
    from pyro_vae.analysis.gradients import estimator_gradient_statistics
    from pyro_vae.analysis.units import active_units
    from pyro_vae.app.compare import compare_estimators
    from pyro_vae.app.diagnose import diagnose
    from pyro_vae.app.runs import load_run
    from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from pyro_vae.data import VAEData, load_data
    from pyro_vae.models.build import build_vae
    from pyro_vae.models.hierarchical import HierarchicalVAE
    from pyro_vae.models.kl import gaussian_kl
    from pyro_vae.models.protocol import ModelSites, PyroModel, model_sites
    from pyro_vae.models.vae import DATA_PLATE, LATENT_SITE, OBSERVED_SITE, VAE
    from pyro_vae.objectives.importance import ImportanceWeightedELBO
    from pyro_vae.objectives.options import Option
    from pyro_vae.objectives.registry import (
        ESTIMATORS,
        estimator_spec,
        make_elbo,
        register_estimator,
    )
    from pyro_vae.objectives.spec import Estimator
    from pyro_vae.objectives.terms import (
        ElboTerms,
        elbo_terms,
        log_importance_weights,
        tutorial_loss,
    )
    from pyro_vae.training.fit import fit
    from pyro_vae.training.trainer import History


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_MODULES))
