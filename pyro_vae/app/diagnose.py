"""``pyro-vae diagnose``: the diagnostics of :mod:`pyro_vae.analysis.diagnostics` on a
run folder, written as JSON, NetCDF, markdown and PNG plots."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from pyro_vae.analysis.diagnostics import (
    GAPS_SKIPPED,
    _arviz,
    _compare_moments,
    guide_draws,
    inference_gaps,
    nuts_posterior,
    nuts_summary,
)
from pyro_vae.errors import UserInputError
from pyro_vae.io import atomic_write_json, atomic_write_text


# ------------------------------------------------------------------ the command
def diagnose(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    images: int = 10,
    image_ids: Sequence[int] | None = None,
    chains: int = 4,
    warmup: int = 300,
    samples: int = 300,
    is_samples: int = 5000,
    local_steps: int = 1000,
    khat_images: int = 1000,
    khat_samples: int = 1000,
    seed: int = 0,
    jit: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    compile: bool | None = None,
) -> dict[str, Any]:
    """``pyro-vae diagnose``: NUTS reference posterior, gaps, PSIS k-hat; files in out_dir.

    Writes ``nuts.nc`` and ``guide.nc`` (ArviZ InferenceData), ``diagnostics.json``,
    ``diagnostics.md`` and ``plots/*.png``. Every measurement runs with the networks in
    eval mode.
    ``compile``: draw importance weights through captured graphs (``None``: when the
    amount of work repays the capture).
    """
    from pyro_vae.analysis.evaluation import (
        KHAT_MIN_SAMPLES,
        KHAT_THRESHOLD,
        khat_summary,
        log_likelihood_and_khat,
    )
    from pyro_vae.app.runs import RunLock, load_run

    if images < 1:
        raise UserInputError(f"--images must be >= 1, got {images}")
    if chains < 1:
        raise UserInputError(f"--chains must be >= 1, got {chains}")
    if min(warmup, samples, is_samples, local_steps, khat_samples, khat_images) < 1:
        raise UserInputError(
            "--warmup, --samples, --is-samples, --local-steps, --khat-images and "
            "--khat-samples must each be >= 1"
        )
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "diagnostics"
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file: pass a folder")
    if (out / "diagnostics.json").exists() and not overwrite:
        raise UserInputError(
            f"{out} holds diagnostics: pass --overwrite to replace them, or another --out"
        )
    config, vae, data, _ = load_run(run_dir)
    test = data.evaluation_images("test")
    ids = list(image_ids) if image_ids is not None else list(range(min(images, len(test))))
    bad = [i for i in ids if not 0 <= i < len(test)]
    if bad:
        raise UserInputError(
            f"image index {bad[0]} is out of range: the test set has {len(test)} images "
            f"(0 to {len(test) - 1})"
        )
    if not ids:
        raise UserInputError("no images selected")
    x = test[ids]
    started = time.perf_counter()
    if log:
        log(f"NUTS: {chains} chains x ({warmup} warmup + {samples} draws) on {len(ids)} images")
    nuts = nuts_posterior(vae, x, chains, warmup, samples, seed, ids, jit=jit, progress=progress)
    guide = guide_draws(vae, x, chains, samples, seed, ids)
    if len(vae.latent_sites) == 1:
        if log:
            log("gaps: local SVI per image, importance-sampled log p(x) ...")
        gaps = inference_gaps(
            vae,
            x,
            is_samples,
            local_steps=local_steps,
            seed=seed,
            progress=progress,
            compile=compile,
        )
        gaps.pop("local_guide")
    else:
        gaps = {"skipped": GAPS_SKIPPED}
    n_khat = min(khat_images, len(test))
    if log:
        log(f"PSIS k-hat on {n_khat} test images, K={khat_samples} ...")
    with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        _, khat = log_likelihood_and_khat(
            vae, test[:n_khat], khat_samples, progress=progress, compile=compile
        )
    fitted = khat_samples >= KHAT_MIN_SAMPLES and bool(np.isfinite(khat).any())
    worst = np.argsort(-np.nan_to_num(khat, nan=-np.inf))[:16] if fitted else np.array([], int)
    summary = nuts_summary(nuts)
    moments = _compare_moments(nuts, guide)
    khat_result: dict[str, Any] = {"images": n_khat, "samples": khat_samples}
    if fitted:
        finite = khat[np.isfinite(khat)]
        khat_result.update(
            {
                "mean": float(finite.mean()),
                "max": float(finite.max()),
                "share_above_0.7": float((finite > KHAT_THRESHOLD).mean()),
                "share_above_0.5": float((finite > 0.5).mean()),
                "worst": [{"image": int(i), "khat": float(khat[i])} for i in worst],
            }
        )
    else:
        khat_result["note"] = khat_summary(khat, khat_samples)["khat_note"]
    result = {
        "run_dir": str(run_dir),
        "image_ids": ids,
        "nuts": summary,
        "guide_vs_nuts": moments,
        "gaps": gaps,
        "khat": khat_result,
        "seconds": time.perf_counter() - started,
    }
    # everything is computed: now the folder, locked, with every file replaced atomically;
    # inside the run folder, the run's own lock (a `train --overwrite` moves that folder)
    inside = Path(out).resolve().is_relative_to(run_dir.resolve())
    with RunLock(run_dir if inside else out, f"pyro-vae diagnose {run_dir}"):
        Path(out).mkdir(parents=True, exist_ok=True)
        if (out / "diagnostics.json").exists() and not overwrite:
            raise UserInputError(
                f"{out} holds diagnostics: pass --overwrite to replace them, or another --out"
            )
        for name, idata in (("nuts.nc", nuts), ("guide.nc", guide)):
            _write_netcdf(idata, out / name)
        atomic_write_json(result, out / "diagnostics.json")
        plots = _plots(out, vae, nuts, guide, gaps, khat, test, worst, ids)
        _markdown(out / "diagnostics.md", result, plots)
    return result


def _write_netcdf(idata, path: Path) -> None:
    """ArviZ's netCDF file, written beside ``path`` and renamed over it (atomic)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        idata.to_netcdf(str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _plots(out, vae, nuts, guide, gaps, khat, test, worst, ids) -> list[Path]:
    from pyro_vae.app.plots import _grid, _pyplot, _save

    plt = _pyplot()
    az = _arviz()
    folder = out / "plots"
    paths = []
    site = list(nuts.posterior.data_vars)[-1]
    dim_name = f"{site}_dim"
    # the most informative dimensions: smallest posterior spread (inactive units sit at
    # the prior, where guide and posterior agree trivially)
    spread = nuts.posterior[site].std(("chain", "draw")).mean("image").values
    dims = [int(d) for d in np.argsort(spread)[:3]]
    shown = ids[: min(3, len(ids))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selection = {"image": shown, dim_name: dims}
        axes = az.plot_density(
            [nuts.sel(**selection), guide.sel(**selection)],
            data_labels=["NUTS p(z|x)", "guide q(z|x)"],
            var_names=[site],
            shade=0.1,
            grid=(len(shown), len(dims)),
            figsize=(3.2 * len(dims), 2.6 * len(shown)),
        )
    for ax in np.asarray(axes).ravel():  # ArviZ titles a panel "z\n0, 18": say what it is
        name, _, coords = ax.get_title().partition("\n")
        if coords:
            image, _, dim = coords.partition(", ")
            ax.set_title(f"test image #{image}, {name} dimension {dim}", fontsize=9)
    fig = np.asarray(axes).ravel()[0].get_figure()
    fig.suptitle(
        f"posterior marginals of {site}: NUTS against the guide (the 3 most informative dims)",
        fontsize=10,
    )
    paths.append(_save(fig, folder / "marginals_nuts_vs_guide.png"))

    finite = khat[np.isfinite(khat)]
    if len(worst) == 0:  # too few importance samples for any Pareto fit: nothing to plot
        return paths + _gap_plots(plt, folder, gaps, ids)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.hist(finite, bins=40, color="C0")
    for threshold, style in ((0.5, ":"), (0.7, "--")):
        ax.axvline(threshold, color="k", ls=style, label=f"k = {threshold}")
    ax.set_xlabel("PSIS k-hat of the importance weights (encoder as proposal)")
    ax.set_ylabel("test images")
    ax.set_title(
        f"k-hat: {np.mean(finite > 0.7):.0%} of {len(finite)} images above 0.7", fontsize=10
    )
    ax.legend(fontsize=8)
    paths.append(_save(fig, folder / "khat.png"))

    fig, ax = plt.subplots(figsize=(8, 1.3))
    shape = vae.data_shape if len(vae.data_shape) == 3 else (1, 1, vae.data_dim)
    images = test[torch.as_tensor(worst)].reshape(-1, *shape)
    ax.imshow(_grid(images, len(worst)), cmap="gray", interpolation="nearest")
    ax.set_title(
        "highest k-hat: "
        + ", ".join(f"#{i} {khat[i]:.2f}" for i in worst[:8])
        + (" ..." if len(worst) > 8 else ""),
        fontsize=8,
    )
    ax.axis("off")
    paths.append(_save(fig, folder / "worst_khat_images.png"))
    return paths + _gap_plots(plt, folder, gaps, ids)


def _gap_plots(plt, folder: Path, gaps: dict[str, Any], ids) -> list[Path]:
    from pyro_vae.app.plots import _save

    if "skipped" in gaps:
        return []
    paths = []
    per = gaps["per_image"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ids) + 2), 4))
    positions = np.arange(len(ids))
    ax.bar(positions, per["approximation_gap"], label="approximation gap", color="C1")
    ax.bar(
        positions,
        per["amortization_gap"],
        bottom=per["approximation_gap"],
        label="amortization gap",
        color="C2",
    )
    ax.set_xticks(positions, [str(i) for i in ids], fontsize=8)
    ax.set_xlabel("test image")
    ax.set_ylabel("nats")
    a, m = gaps["approximation_gap"], gaps["amortization_gap"]
    ax.set_title(
        f"log p(x) - amortized ELBO =\napproximation gap {a['mean']:.2f} "
        f"[{a['ci95_low']:.2f}, {a['ci95_high']:.2f}] + amortization gap {m['mean']:.2f} "
        f"[{m['ci95_low']:.2f}, {m['ci95_high']:.2f}]",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    paths.append(_save(fig, folder / "gaps.png"))
    return paths


def _markdown(path: Path, result: dict[str, Any], plots: list[Path]) -> None:
    gaps, nuts, khat = result["gaps"], result["nuts"], result["khat"]

    def row(name, key):
        v = gaps[key]
        return f"| {name} | {v['mean']:.3f} | [{v['ci95_low']:.3f}, {v['ci95_high']:.3f}] |"

    if "skipped" in gaps:
        gap_lines = [f"Gaps {gaps['skipped']}."]
    else:
        gap_lines = [
            "| quantity | mean | 95% interval |",
            "| --- | --- | --- |",
            row(
                f"log p(x) (importance sampled, K={gaps['importance_samples']})",
                "log_likelihood",
            ),
            row("optimal local ELBO (Gaussian q per image)", "optimal_local_elbo"),
            row("amortized ELBO (the encoder)", "amortized_elbo"),
            row("approximation gap = log p(x) - local ELBO", "approximation_gap"),
            row("amortization gap = local ELBO - amortized ELBO", "amortization_gap"),
        ]
    lines = [
        "# Posterior diagnostics",
        "",
        f"Run: `{result['run_dir']}`; test images {result['image_ids']}. Nats per image.",
        "",
        "## Inference gaps (Cremer et al., 2018)",
        "",
        *gap_lines,
        "",
        "## NUTS reference posterior",
        "",
        f"{nuts['chains']} chains x {nuts['draws_per_chain']} draws; max r-hat "
        f"{nuts['rhat_max']:.3f} ({nuts['rhat_share_above_1.01']:.1%} of coordinates above "
        f"1.01); bulk ESS min {nuts['ess_bulk_min']:.0f}, median {nuts['ess_bulk_median']:.0f}; "
        f"tail ESS min {nuts['ess_tail_min']:.0f}; {nuts['divergences']} divergences.",
        "",
        "Guide against NUTS (medians over coordinates; 'informed': NUTS posterior sd "
        "below 0.5): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["guide_vs_nuts"].items())
        + ".",
        "",
        "## PSIS k-hat",
        "",
        (
            f"{khat['images']} test images, K={khat['samples']}: mean {khat['mean']:.2f}, max "
            f"{khat['max']:.2f}; {khat['share_above_0.7']:.1%} above 0.7 (importance sampling "
            f"unreliable there), {khat['share_above_0.5']:.1%} above 0.5."
            if "mean" in khat
            else f"{khat['images']} test images, K={khat['samples']}: {khat['note']}."
        ),
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{p.stem}](plots/{p.name})\n" for p in plots]
    atomic_write_text("\n".join(lines), path)
