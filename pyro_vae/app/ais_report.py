"""AIS and BDMC beside the importance-sampled log p(x) of ``pyro-vae evaluate``: the
measurements as JSON fields, and their lines of the printed evaluation."""

from __future__ import annotations

import math
from typing import Any

import torch

from pyro_vae.analysis.ais import AISResult, BDMCResult, ais_log_likelihood, bdmc
from pyro_vae.models.protocol import forked_rng
from pyro_vae.resources import human_seconds


def ais_fields(ais: AISResult, both: BDMCResult | None) -> dict[str, Any]:
    """The flat JSON fields of an AIS result (``ais_*``) and of a BDMC result (``bdmc_*``)."""
    fields = {f"ais_{name}": value for name, value in ais.summary().items()}
    if both is not None:
        fields.update({f"bdmc_{name}": value for name, value in both.summary().items()})
    return fields


def measure_ais(
    vae: Any,
    images: torch.Tensor,
    steps: int,
    chains: int,
    leapfrog: int,
    with_bdmc: bool,
    progress: bool,
    seed: int = 0,
) -> dict[str, Any]:
    """AIS on ``images`` (and BDMC on as many simulated points), seeded, as JSON fields."""
    with forked_rng():
        torch.manual_seed(seed)
        ais = ais_log_likelihood(
            vae, images, steps=steps, chains=chains, leapfrog=leapfrog, progress=progress
        )
        both = (
            bdmc(vae, images, steps=steps, chains=chains, leapfrog=leapfrog, progress=progress)
            if with_bdmc
            else None
        )
    return ais_fields(ais, both)


def _plus_minus(mean: float, sem: float | None) -> str:
    if sem is None or math.isnan(sem):
        return f"{mean:9.3f}"
    return f"{mean:9.3f} ± {sem:.3f}"


def format_ais(result: dict[str, Any]) -> str:
    """IS-K, AIS and (when measured) the BDMC gap side by side, nats per image."""
    points = result["points"]
    lines = [
        f"log p(x) side by side on the same {points:,} test images "
        f"(nats per image, mean ± s.e. over images):",
        f"  IS    K={result['importance_samples']:<25,}"
        f"{_plus_minus(result['test_log_likelihood'], result['test_log_likelihood_sem'])}",
        f"  AIS   {_ais_label(result):<27}"
        f"{_plus_minus(result['ais_log_likelihood'], result['ais_log_likelihood_sem'])}"
        f"   (chains' s.e. {result['ais_chain_standard_error']:.3f}, acceptance "
        f"{result['ais_acceptance_rate']:.2f}, {human_seconds(result['ais_seconds'])})",
        f"  AIS - IS {'':<24}{result['ais_log_likelihood'] - result['test_log_likelihood']:+9.3f}"
        f"   (AIS is a lower bound too: higher is closer to log p(x))",
    ]
    if "bdmc_gap" in result:
        lines.append(
            f"  BDMC  gap on {result['bdmc_points']:,} simulated images{'':<5}"
            f"{_plus_minus(result['bdmc_gap'], result['bdmc_gap_sem'])}   (lower "
            f"{result['bdmc_lower']:.3f}, upper {result['bdmc_upper']:.3f}, max gap "
            f"{result['bdmc_gap_max']:.3f}, {human_seconds(result['bdmc_seconds'])})"
        )
    return "\n".join(lines)


def _ais_label(result: dict[str, Any]) -> str:
    return (
        f"T={result['ais_steps']:,}, C={result['ais_chains']}, L={result['ais_leapfrog']}"
        f" ({result['ais_start']})"
    )
