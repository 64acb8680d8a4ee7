"""Rendering a :class:`~pyro_vae.analysis.diagnostics.Diagnosis`: ``nuts.nc``,
``guide.nc``, ``diagnostics.json``, ``diagnostics.md``, the plots and the console lines.
Everything here takes the data and computes nothing."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pyro_vae.analysis.diagnostics import Diagnosis, _arviz
from pyro_vae.io import atomic_write_json, atomic_write_text


def write_diagnosis(out: Path, diagnosis: Diagnosis) -> list[Path]:
    """Every file of a diagnosis in ``out`` (which exists), each replaced atomically;
    returns the plots' paths."""
    _write_netcdf(diagnosis.nuts_draws, out / "nuts.nc")
    _write_netcdf(diagnosis.guide_draws, out / "guide.nc")
    atomic_write_json(diagnosis.to_dict(), out / "diagnostics.json")
    plots = write_plots(out / "plots", diagnosis)
    atomic_write_text(diagnosis_markdown(diagnosis.to_dict(), plots), out / "diagnostics.md")
    return plots


def _write_netcdf(idata: Any, path: Path) -> None:
    """ArviZ's netCDF file, written beside ``path`` and renamed over it (atomic)."""
    from pyro_vae.io import check_no_link

    check_no_link(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        idata.to_netcdf(str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ------------------------------------------------------------------ console
def console_lines(result: Mapping[str, Any]) -> list[str]:
    """The gaps, NUTS's convergence and k-hat of ``diagnostics.json``'s dict, as lines."""
    gaps, nuts, khat = result["gaps"], result["nuts"], result["khat"]
    lines = [f"gaps {gaps['skipped']}"] if "skipped" in gaps else []
    for key, label in (
        ("approximation_gap", "approximation gap"),
        ("amortization_gap", "amortization gap"),
    ):
        if key not in gaps:
            continue
        v = gaps[key]
        lines.append(
            f"{label:18} {v['mean']:7.3f} nats  (95% interval {v['ci95_low']:.3f} to "
            f"{v['ci95_high']:.3f}, {gaps['images']} images)"
        )
    khat_text = (
        f"k-hat > 0.7 for {khat['share_above_0.7']:.1%} of {khat['images']} images"
        if khat.get("share_above_0.7") is not None
        else f"k-hat {khat['note']}"
    )
    lines.append(
        f"NUTS: max r-hat {nuts['rhat_max']:.3f}, min bulk ESS {nuts['ess_bulk_min']:.0f}, "
        f"{nuts['divergences']} divergences; {khat_text}"
    )
    return lines


# ------------------------------------------------------------------ markdown
def _gap_table(gaps: Mapping[str, Any]) -> list[str]:
    if "skipped" in gaps:
        return [f"Gaps {gaps['skipped']}."]

    def row(name: str, key: str) -> str:
        v = gaps[key]
        return f"| {name} | {v['mean']:.3f} | [{v['ci95_low']:.3f}, {v['ci95_high']:.3f}] |"

    return [
        "| quantity | mean | 95% interval |",
        "| --- | --- | --- |",
        row(f"log p(x) (importance sampled, K={gaps['importance_samples']})", "log_likelihood"),
        row("optimal local ELBO (Gaussian q per image)", "optimal_local_elbo"),
        row("amortized ELBO (the encoder)", "amortized_elbo"),
        row("approximation gap = log p(x) - local ELBO", "approximation_gap"),
        row("amortization gap = local ELBO - amortized ELBO", "amortization_gap"),
    ]


def _khat_sentence(khat: Mapping[str, Any]) -> str:
    if "mean" not in khat:
        return f"{khat['images']} test images, K={khat['samples']}: {khat['note']}."
    return (
        f"{khat['images']} test images, K={khat['samples']}: mean {khat['mean']:.2f}, max "
        f"{khat['max']:.2f}; {khat['share_above_0.7']:.1%} above 0.7 (importance sampling "
        f"unreliable there), {khat['share_above_0.5']:.1%} above 0.5."
    )


def diagnosis_markdown(result: Mapping[str, Any], plots: list[Path]) -> str:
    """``diagnostics.md`` from ``diagnostics.json``'s dict and the plots' paths."""
    nuts = result["nuts"]
    lines = [
        "# Posterior diagnostics",
        "",
        f"Run: `{result['run_dir']}`; test images {result['image_ids']}. Nats per image.",
        "",
        "## Inference gaps (Cremer et al., 2018)",
        "",
        *_gap_table(result["gaps"]),
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
        _khat_sentence(result["khat"]),
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{p.stem}](plots/{p.name})\n" for p in plots]
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
def write_plots(folder: Path, d: Diagnosis) -> list[Path]:
    """The marginals of NUTS against the guide, k-hat (when fitted) and the gaps."""
    from pyro_vae.app.plots import _pyplot

    plt = _pyplot()
    paths = [_marginals(folder, d)]
    if len(d.worst):  # too few importance samples for any Pareto fit: no k-hat plots
        paths.append(_khat_histogram(plt, folder, d))
        if d.worst_images is not None:  # (a model that does not say its data's shape)
            paths.append(_worst_khat_images(plt, folder, d))
    if "skipped" not in d.gaps:
        paths.append(_gaps(plt, folder, d.gaps, d.image_ids))
    return paths


def _marginals(folder: Path, d: Diagnosis) -> Path:
    from pyro_vae.app.plots import _save

    az = _arviz()
    nuts, ids = d.nuts_draws, d.image_ids
    site = list(nuts.posterior.data_vars)[-1]
    # the most informative dimensions: smallest posterior spread (inactive units sit at
    # the prior, where guide and posterior agree trivially)
    spread = nuts.posterior[site].std(("chain", "draw")).mean("image").values
    dims = [int(dim) for dim in np.argsort(spread)[:3]]
    shown = ids[: min(3, len(ids))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selection = {"image": shown, f"{site}_dim": dims}
        axes = az.plot_density(
            [nuts.sel(**selection), d.guide_draws.sel(**selection)],
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
    return _save(fig, folder / "marginals_nuts_vs_guide.png")


def _khat_histogram(plt: Any, folder: Path, d: Diagnosis) -> Path:
    from pyro_vae.app.plots import _save

    finite = d.khat_values[np.isfinite(d.khat_values)]
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
    return _save(fig, folder / "khat.png")


def _worst_khat_images(plt: Any, folder: Path, d: Diagnosis) -> Path:
    from pyro_vae.app.plots import _grid, _save

    worst, khat = d.worst, d.khat_values
    assert d.worst_images is not None
    fig, ax = plt.subplots(figsize=(8, 1.3))
    ax.imshow(_grid(d.worst_images, len(worst)), cmap="gray", interpolation="nearest")
    ax.set_title(
        "highest k-hat: "
        + ", ".join(f"#{i} {khat[i]:.2f}" for i in worst[:8])
        + (" ..." if len(worst) > 8 else ""),
        fontsize=8,
    )
    ax.axis("off")
    return _save(fig, folder / "worst_khat_images.png")


def _gaps(plt: Any, folder: Path, gaps: Mapping[str, Any], ids: list[int]) -> Path:
    from pyro_vae.app.plots import _save

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
    return _save(fig, folder / "gaps.png")
