"""pyro-vae: the variational autoencoder as a Pyro program, with an objective you can see.

Conventions: every ELBO and log-likelihood is in nats per data point, higher is better;
the quantity minimised is ``loss = -elbo``; an ELBO is reported with its two terms,
``elbo = expected_log_likelihood - kl``.

Importing this package is cheap: names are loaded from their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "VAE": "model",
    "build_vae": "model",
    "LATENT_SITE": "model",
    "OBSERVED_SITE": "model",
    "DATA_PLATE": "model",
    "gaussian_kl": "kl",
    "make_elbo": "estimators",
    "ESTIMATORS": "estimators",
    "ImportanceWeightedELBO": "estimators",
    "elbo_terms": "estimators",
    "ElboTerms": "estimators",
    "tutorial_loss": "estimators",
    "log_importance_weights": "estimators",
    "log_likelihood": "evaluation",
    "load_data": "data",
    "VAEData": "data",
    "ModelConfig": "config",
    "DataConfig": "config",
    "TrainConfig": "config",
    "RunConfig": "config",
    "exact": None,
    "data": None,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")
    module_name = _EXPORTS[name]
    if module_name is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{module_name}", __name__), name)


def __dir__() -> list[str]:
    return __all__
