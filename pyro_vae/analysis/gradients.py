"""Gradient variance and signal-to-noise ratio of an estimator at fixed parameters.

M gradient estimates with fresh noise at fixed parameters and a fixed mini-batch; per
parameter group (encoder: the guide's parameters, decoder: the model's) the total
variance, the mean per-parameter signal-to-noise ratio ``|mean| / std`` (Rainforth et
al., "Tighter Variational Bounds are Not Necessarily Better", 2018) and, given a
reference gradient, the bias.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyro
import torch
from pyro import poutine

from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import (
    PyroModel,
    as_batch,
    forked_rng,
    model_sites,
    on_model_device,
    parameters_of,
    private_param_store,
    scaled,
)
from pyro_vae.objectives.registry import make_elbo
from pyro_vae.objectives.traces import sample_sites

GROUPS = ("encoder", "decoder", "shared")


# ------------------------------------------------------------------ gradients
def parameter_groups(vae: PyroModel, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """The trainable parameters the guide uses (encoder), the model uses (decoder), or
    both (shared), in the order of the networks' own ``parameters()``.

    Found by autograd from the object's own parameters: ``log q(z|x)`` at a draw of the
    guide depends on the guide's, ``log p(x, z)`` at that draw (held fixed) on the
    model's. Never read from Pyro's param store, which may hold another model's tensors
    under the same names.
    """
    x = on_model_device(vae, x)
    params = [p for p in parameters_of(vae) if p.requires_grad]
    if not params:
        return {"encoder": [], "decoder": [], "shared": []}
    with torch.enable_grad(), pyro.validation_enabled(False), private_param_store():
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        draws = {s["name"]: s["value"].detach() for s in sample_sites(guide_trace)}
        model_trace = poutine.trace(poutine.condition(vae.model, data=draws)).get_trace(x)
        used = {}
        for part, trace in (("guide", guide_trace), ("model", model_trace)):
            log_p = sum(s["fn"].log_prob(s["value"]).sum() for s in sample_sites(trace))
            grads = torch.autograd.grad(log_p, params, allow_unused=True)
            used[part] = {id(p) for p, g in zip(params, grads) if g is not None}
    return {
        "encoder": [p for p in params if id(p) in used["guide"] and id(p) not in used["model"]],
        "decoder": [p for p in params if id(p) in used["model"] and id(p) not in used["guide"]],
        "shared": [p for p in params if id(p) in used["guide"] and id(p) in used["model"]],
    }


def gradient_draws(
    vae: PyroModel, x: torch.Tensor, elbo, num_draws: int, num_data: int | None = None
) -> dict[str, torch.Tensor]:
    """``num_draws`` estimates of the gradient of ``-objective``, fresh noise each time.

    Returns, per parameter group, a float64 tensor ``(num_draws, parameters)``. The
    parameters and the mini-batch stay fixed. (Each draw needs its own backward pass;
    the particles within a draw are vectorized.) The networks are in eval mode while the
    draws are taken (dropout would add its own noise, BatchNorm would update its
    statistics), and get their own modes back afterwards.
    """
    from pyro_vae.analysis.evaluation import evaluation_mode

    if num_draws < 2:
        raise UserInputError(f"gradient statistics need at least 2 draws, got {num_draws}")
    x = on_model_device(vae, x)
    with evaluation_mode(vae):
        groups = parameter_groups(vae, x)
    draws: dict[str, list[torch.Tensor]] = {name: [] for name, params in groups.items() if params}
    parameters = [p for params in groups.values() for p in params]
    with pyro.validation_enabled(False), evaluation_mode(vae):
        for _ in range(num_draws):
            for p in parameters:
                p.grad = None
            scale = 1.0 if num_data is None else num_data / x.shape[0]
            elbo.differentiable_loss(
                scaled(vae.model, scale), scaled(vae.guide, scale), x
            ).backward()
            for name in draws:
                draws[name].append(
                    torch.cat(
                        [
                            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                            for p in groups[name]
                        ]
                    ).double()
                )
    for p in parameters:
        p.grad = None
    return {name: torch.stack(values) for name, values in draws.items()}


def gradient_statistics(
    draws: torch.Tensor, reference: torch.Tensor | None = None
) -> dict[str, float]:
    """Total variance, SNR and (given a reference gradient) bias of gradient draws.

    ``draws`` is ``(M, P)``. ``snr_mean`` averages ``|mean_p| / std_p`` over the P
    coordinates whose draws vary; ``variance`` is ``sum_p var_p`` (the trace of the
    covariance); ``bias_norm`` is ``||mean - reference||`` and ``bias_z_max`` the
    largest ``|mean_p - reference_p|`` in standard errors of the mean.
    """
    m = draws.shape[0]
    mean, std = draws.mean(0), draws.std(0)
    varying = std > 0
    snr = mean[varying].abs() / std[varying]
    result = {
        "draws": m,
        "parameters": int(draws.shape[1]),
        "variance": float(std.pow(2).sum()),
        "snr_mean": float(snr.mean()) if snr.numel() else float("nan"),
        "snr_median": float(snr.median()) if snr.numel() else float("nan"),
        "mean_norm": float(mean.norm()),
    }
    if reference is not None:
        reference = reference.double().reshape(-1)
        bias = mean - reference
        standard_error = std / math.sqrt(m)
        z = bias[varying].abs() / standard_error[varying]
        result.update(
            {
                "bias_norm": float(bias.norm()),
                "relative_bias": float(bias.norm() / reference.norm().clamp_min(1e-300)),
                "bias_z_max": float(z.max()) if z.numel() else 0.0,
            }
        )
    return result


def estimator_gradient_statistics(
    vae: PyroModel,
    x: torch.Tensor,
    estimator: Any,
    num_particles: int,
    num_draws: int,
    reference: dict[str, torch.Tensor] | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`gradient_statistics` of one estimator, per parameter group.

    :param estimator: a name, an import path ``package.module:Name``, an
        :class:`~pyro_vae.objectives.registry.Estimator` or an ELBO object (any Pyro ELBO:
        one without ``differentiable_loss`` is measured through
        :class:`~pyro_vae.objectives.adapters.LossAndGradsAdapter`).
    :param options: the estimator's options (``{"alpha": 0.3}`` for renyi).
    """
    model_sites(vae, as_batch(vae, x))  # the protocol's checks, as every tool makes them
    elbo = make_elbo(estimator, num_particles, options=options)
    draws = gradient_draws(vae, x, elbo, num_draws)
    return {
        group: gradient_statistics(values, None if reference is None else reference.get(group))
        for group, values in draws.items()
    }


def snr_versus_particles(
    vae: PyroModel,
    x: torch.Tensor,
    estimators: Sequence[str] = ("iwae", "dreg"),
    particles: Sequence[int] = (1, 3, 10, 30),
    num_draws: int = 100,
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Encoder and decoder SNR (and variance) of each estimator for each K; each from
    ``seed``, the caller's torch streams untouched. ``options``: per estimator, its
    options (an outer-sample option M stays at its value while K varies)."""
    rows = []
    for estimator in estimators:
        for k in particles:
            rows.append(
                _snr_row(vae, x, estimator, k, num_draws, seed, (options or {}).get(estimator))
            )
    return rows


def snr_versus_outer(
    vae: PyroModel,
    x: torch.Tensor,
    estimator: str,
    option: str,
    outer: Sequence[int] = (1, 2, 4, 8),
    particles: int = 5,
    num_draws: int = 100,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Encoder and decoder SNR of one estimator for each value M of its outer-sample
    option ``option`` (MIWAE(M, K)'s M) at ``particles`` = K; rows as
    :func:`snr_versus_particles`'s, with ``varied`` "M" and ``outer``."""
    rows = []
    for m in outer:
        row = _snr_row(
            vae, x, estimator, particles, num_draws, seed, {**(options or {}), option: m}
        )
        rows.append({**row, "varied": "M", "outer": m})
    return rows


def _snr_row(vae: PyroModel, x, estimator, k, num_draws, seed, options) -> dict[str, Any]:
    with forked_rng():
        torch.manual_seed(seed)
        stats = estimator_gradient_statistics(vae, x, estimator, k, num_draws, options=options)
    row: dict[str, Any] = {"estimator": estimator, "particles": k}
    for group, values in stats.items():
        row[f"{group}_snr"] = values["snr_mean"]
        row[f"{group}_variance"] = values["variance"]
    return row
