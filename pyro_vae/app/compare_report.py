"""Rendering a :class:`~pyro_vae.analysis.comparison.Comparison`: ``comparison.json``,
``.csv``, ``.md``, the plots and the console lines. Everything here takes the data and
computes nothing."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from pyro_vae.analysis.comparison import Comparison
from pyro_vae.io import atomic_write_json, atomic_write_text


def write_comparison(out: Path, comparison: Comparison) -> list[Path]:
    """``comparison.json``, ``.csv``, the plots and ``comparison.md`` in ``out``;
    returns the plots' paths."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(comparison.to_dict(), out / "comparison.json")
    write_csv(out / "comparison.csv", comparison.summary)
    plots = write_plots(out / "plots", comparison)
    atomic_write_text(comparison_markdown(comparison, plots), out / "comparison.md")
    return plots


def run_line(run: dict[str, Any], eval_samples: int) -> str:
    """One trained run as a console line."""
    evaluation = run["evaluation"]
    return (
        f"{run['estimator']} (seed {run['seed']}): test ELBO "
        f"{evaluation['test_elbo']:.3f}, log p(x) {evaluation['test_log_likelihood']:.3f} "
        f"(K={eval_samples}), own objective {run['test_objective']:.3f}, "
        f"{run['seconds_per_epoch']:.2f} s/epoch"
    )


def write_csv(path: Path, summary: list[dict[str, Any]]) -> None:
    """The summary as CSV, written atomically (never through a link at ``path``)."""
    import io

    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(summary[0]))
    writer.writeheader()
    writer.writerows(summary)
    atomic_write_text(buffer.getvalue(), path)


# ------------------------------------------------------------------ markdown
def _pm(row: dict[str, Any], field: str, digits: int = 2) -> str:
    value, std = row[field], row[f"{field}_std"]
    if row["repeats"] > 1:
        return f"{value:.{digits}f} ± {std:.{digits}f}"
    return f"{value:.{digits}f}"


def markdown_table(
    summary: list[dict[str, Any]],
    eval_samples: int | None = None,
    ais_steps: int | None = None,
    flagged: set[str] = frozenset(),  # type: ignore[assignment]
) -> str:
    """The summary as a markdown table (rendering only); ``eval_samples`` is the K of its
    log p(x), named in the header; with ``ais_steps``, the AIS log p(x) beside it; the
    estimators in ``flagged`` (with a number that cannot be right) are marked ⚠."""
    k = f", K={eval_samples}" if eval_samples else ""
    ais = f" AIS log p(x), T={ais_steps} |" if ais_steps else ""
    lines = [
        f"| estimator | test ELBO | test log p(x){k} |{ais} own objective − log p(x) | "
        "encoder SNR | decoder SNR | encoder grad. variance | decoder grad. variance | "
        "active units | units with KL > 0.1 nats | s / epoch (wall) | CPU s / epoch |",
        "| --- " * (13 if ais_steps else 12) + "|",
    ]
    for row in summary:
        ais_cell = f" {_pm(row, 'ais_log_likelihood')} |" if ais_steps else ""
        lines.append(
            f"| {row['estimator']}{' ⚠' if row['estimator'] in flagged else ''} | "
            f"{_pm(row, 'test_elbo')} | {_pm(row, 'test_log_likelihood')} |"
            f"{ais_cell} "
            f"{_pm(row, 'objective_minus_log_likelihood')} | {_pm(row, 'encoder_snr', 3)} | "
            f"{_pm(row, 'decoder_snr', 3)} | {row['encoder_variance']:.3g} | "
            f"{row['decoder_variance']:.3g} | {row['active_units']:.0f} | "
            f"{row['informative_units']:.0f} | {_pm(row, 'seconds_per_epoch')} | "
            f"{_pm(row, 'cpu_seconds_per_epoch')} |"
        )
    return "\n".join(lines)


def _budget_paragraph(c: Comparison) -> str:
    train = c.config["train"]
    return (
        f"Equal budget: every estimator trained from the same initial parameters with the "
        f"same data order, {c.summary[0]['steps']} gradient steps "
        f"({train['epochs']} epochs, batch {train['batch_size']}), K = {train['particles']} "
        f"samples per data point, Adam {train['lr']:g}; {c.repeats} repeat(s) "
        f"(± is the standard deviation over repeats). Test log p(x): importance sampled, "
        f"K = {c.eval_samples}, {c.eval_points} test points. Gradient "
        f"statistics: {c.grad_draws} draws at each model's final parameters on "
        f"{c.grad_batch} test points; SNR is the mean over parameters of "
        f"|mean| / std. 'own objective − log p(x)' is each estimator's own objective on the "
        f"test set minus log p(x): a lower bound must be ≤ 0 (up to Monte Carlo error). "
        f"Active units: Cov_x E_q[z] > 0.01 (Burda et al.), beside the units that carry "
        f"more than 0.1 nats of KL. Wall time per epoch swings with other processes' load; "
        f"CPU time does much less."
    )


def _bounds_section(c: Comparison) -> list[str]:
    bounds = c.bounds_versus_particles
    if not bounds:
        return []
    first = next(iter(bounds.values()))
    ks, samples = first["particles"], first["log_likelihood_samples"]
    lines = [
        f"Bounds against K (first repeat's models, nats per data point) on the first "
        f"{c.bound_points} test points, with log p(x) estimated from "
        f"K={samples} samples (never fewer than the largest "
        f"bound's); the main table's log p(x) is over {c.eval_points} points, so "
        f"the two differ by their subsets:",
        "",
        "| trained with | "
        + " | ".join(f"L_{k}" for k in ks)
        + f" | log p(x), K={samples} | penalty objective |",
        "| --- |" + " --- |" * (len(ks) + 2),
    ]
    for name, b in bounds.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{v:.2f}" for v in b["bound_means"])
            + f" | {b['log_likelihood']:.2f} | {b['penalty_objective']:.2f} |"
        )
    return [*lines, ""]


def _flagged(c: Comparison) -> set[str]:
    return {f["where"].removeprefix("estimator ") for f in c.flags}


def _warnings(c: Comparison) -> list[str]:
    """The comparison's flags (numbers that cannot be right), before the table."""
    if not c.flags:
        return []
    lines = ["**Warnings: numbers that cannot be right** (marked ⚠ in the table)", ""]
    for f in c.flags:
        lines.append(f"- **{f['where']}: {f['quantity']} = {f['value']:.3f}: {f['reason']}**")
    return [*lines, ""]


def comparison_markdown(c: Comparison, plots: list[Path]) -> str:
    """``comparison.md``: the budget, the summary table, the bounds, plots, the command."""
    lines = [
        f"# Estimator comparison: {c.config['data']['dataset']}",
        "",
        _budget_paragraph(c),
        "",
        *_warnings(c),
        markdown_table(c.summary, c.eval_samples, c.ais_steps, _flagged(c)),
        "",
        *_bounds_section(c),
        "## Plots",
        "",
        *[f"![{p.stem}](plots/{p.name})\n" for p in plots],
    ]
    if c.command:
        lines += ["## Reproduce", "", "```", c.command, "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
def write_plots(folder: Path, c: Comparison) -> list[Path]:
    """The four figures of a comparison, in ``folder``."""
    from pyro_vae.app.plots import _pyplot

    plt = _pyplot()
    return [
        _learning_curves(plt, folder, c),
        _snr_against_k(plt, folder, c),
        _gradient_variance(plt, folder, c),
        _bounds_against_k(plt, folder, c),
    ]


def _learning_curves(plt, folder: Path, c: Comparison) -> Path:
    from pyro_vae.app.plots import _save

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, name in enumerate(c.estimators):
        histories = [r["history"] for r in c.runs if r["estimator"] == name]
        epochs = [e["epoch"] for e in histories[0]]
        values = np.array([[e["test_elbo"] for e in h] for h in histories])
        ax.plot(epochs, values.mean(0), label=name, color=f"C{index}")
        if len(histories) > 1:
            ax.fill_between(epochs, values.min(0), values.max(0), color=f"C{index}", alpha=0.2)
    ax.set_xlabel("epoch (equal number of gradient steps)")
    ax.set_ylabel("test ELBO (nats per data point)")
    ax.set_title("Learning curves: test ELBO, same data order and steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, folder / "learning_curves.png")


def _snr_against_k(plt, folder: Path, c: Comparison) -> Path:
    from pyro_vae.app.plots import _save

    snr_rows = c.snr_versus_particles["rows"]
    reference_name = c.snr_versus_particles["parameters_of"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for group, ax in zip(("encoder", "decoder"), axes):
        for index, name in enumerate(sorted({r["estimator"] for r in snr_rows})):
            rows = [r for r in snr_rows if r["estimator"] == name]
            ax.plot(
                [r["particles"] for r in rows],
                [r.get(f"{group}_snr", np.nan) for r in rows],
                "o-",
                label=name,
                color=f"C{index}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (particles)")
        ax.set_ylabel("mean SNR |mean| / std")
        ax.set_title(
            f"{group} gradient SNR against K ({reference_name}-trained parameters)", fontsize=10
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(fig, folder / "snr_vs_k.png")


def _gradient_variance(plt, folder: Path, c: Comparison) -> Path:
    from pyro_vae.app.plots import _save

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for group, ax in zip(("encoder", "decoder"), axes):
        variances = [
            np.mean(
                [
                    r["gradients"].get(group, {}).get("variance", np.nan)
                    for r in c.runs
                    if r["estimator"] == name
                ]
            )
            for name in c.estimators
        ]
        ax.bar(c.estimators, variances, color=[f"C{i}" for i in range(len(c.estimators))])
        ax.set_yscale("log")
        ax.set_title(f"{group} gradient variance (trace of covariance)", fontsize=10)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, folder / "gradient_variance.png")


def _bounds_against_k(plt, folder: Path, c: Comparison) -> Path:
    from pyro_vae.app.plots import _save

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (name, b) in enumerate(c.bounds_versus_particles.items()):
        ax.plot(b["particles"], b["bound_means"], "o-", color=f"C{index}", label=f"L_K, {name}")
        ax.axhline(b["log_likelihood"], color=f"C{index}", ls=":", lw=1)
        if name == "penalty":
            ax.axhline(
                b["penalty_objective"],
                color=f"C{index}",
                ls="--",
                lw=1.5,
                label="penalty objective (penalty model)",
            )
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("nats per data point")
    ax.set_title("L_1 (ELBO) <= L_K <= log p(x) (dotted: log p(x), K=5000 or as set)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, folder / "bounds_vs_k.png")
