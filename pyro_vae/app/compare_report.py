"""Rendering a :class:`~pyro_vae.analysis.comparison.Comparison`: ``comparison.json``,
``.csv``, ``.md`` and the console lines (the plots: :mod:`pyro_vae.app.compare_plots`).
Everything here takes the data and computes nothing."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pyro_vae.analysis.comparison import Comparison
from pyro_vae.app.compare_plots import (
    PAIRED_HEADINGS,
    finite,
    run_words,
    write_plots,
)
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


def _pm(row: dict[str, Any], field: str, digits: int = 2, general: bool = False) -> str:
    """``mean ± h``, h the half-width of the 95% t-interval over the seeds (none for one
    seed, or a row without one)."""
    value, half = row[field], row.get(f"{field}_ci")
    text = f"{value:.3g}" if general else f"{value:.{digits}f}"
    if row.get("repeats", 1) > 1 and finite(half):
        return text + (f" ± {half:.2g}" if general else f" ± {half:.{digits}f}")
    return text


def interval_note(repeats: int, level: float = 0.95) -> str:
    """What the ± of the tables is, in words."""
    if repeats < 2:
        return "n=1, no interval: one seed gives no spread to take an interval from"
    return (
        f"± is the half-width of the {level:.0%} Student-t interval of the mean over the "
        f"n={repeats} seeds (t with {repeats - 1} degree{'s' if repeats > 2 else ''} of "
        f"freedom), not the standard deviation"
    )


def markdown_table(
    summary: list[dict[str, Any]],
    eval_samples: int | None = None,
    ais_steps: int | None = None,
    flagged: set[str] = frozenset(),  # type: ignore[assignment]
    budget: str = "steps",
) -> str:
    """The summary as a markdown table (rendering only); ``eval_samples`` is the K of its
    log p(x), named in the header; with ``ais_steps``, the AIS log p(x) beside it; the
    estimators in ``flagged`` (with a number that cannot be right) are marked ⚠; under a
    ``budget`` other than steps, the steps and samples per data point each run reached.
    Every ± is the half-width of the rows' 95% t-interval over the seeds (``_ci``)."""
    k = f", K={eval_samples}" if eval_samples else ""
    ais = f" AIS log p(x), T={ais_steps} |" if ais_steps else ""
    reached = budget != "steps"
    extra = " steps | samples of z / point | train s (wall) | train s (CPU) |" if reached else ""
    columns = 12 + bool(ais_steps) + 4 * reached
    lines = [
        f"| estimator | test ELBO | test log p(x){k} |{ais} own objective − log p(x) | "
        "encoder SNR | decoder SNR | encoder grad. variance | decoder grad. variance | "
        f"active units | units with KL > 0.1 nats |{extra} s / epoch (wall) | CPU s / epoch |",
        "| --- " * columns + "|",
    ]
    for row in summary:
        ais_cell = f" {_pm(row, 'ais_log_likelihood')} |" if ais_steps else ""
        reached_cells = (
            f" {_pm(row, 'steps_taken', 0)} | {_pm(row, 'samples_per_point', 1)} | "
            f"{_pm(row, 'train_seconds', 1)} | {_pm(row, 'train_cpu_seconds', 1)} |"
            if reached
            else ""
        )
        lines.append(
            f"| {row['estimator']}{' ⚠' if row['estimator'] in flagged else ''} | "
            f"{_pm(row, 'test_elbo')} | {_pm(row, 'test_log_likelihood')} |"
            f"{ais_cell} "
            f"{_pm(row, 'objective_minus_log_likelihood')} | {_pm(row, 'encoder_snr', 3)} | "
            f"{_pm(row, 'decoder_snr', 3)} | {_pm(row, 'encoder_variance', general=True)} | "
            f"{_pm(row, 'decoder_variance', general=True)} | {row['active_units']:.0f} | "
            f"{row['informative_units']:.0f} |{reached_cells} {_pm(row, 'seconds_per_epoch')} | "
            f"{_pm(row, 'cpu_seconds_per_epoch')} |"
        )
    return "\n".join(lines)


def _difference(row: dict[str, Any], digits: int) -> str:
    mean = row["mean"]
    if not finite(mean):
        return "—"
    if row["n"] < 2 or not finite(row["half_width"]):
        return f"{mean:+.{digits}f} (n={row['n']}, no interval)"
    text = f"{mean:+.{digits}f} ± {row['half_width']:.{digits}f}"
    excludes_zero = row["low"] > 0 or row["high"] < 0
    return f"**{text}**" if excludes_zero else text


def paired_table(c: Comparison) -> str:
    """The paired differences against the baseline: one row per estimator, one column
    per metric; bold where the interval excludes 0."""
    rows = c.paired_differences
    if not rows:
        return ""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    lines = [
        f"| estimator − {c.baseline} | "
        + " | ".join(PAIRED_HEADINGS.get(m, f"Δ {m}") for m in metrics)
        + " | seeds paired |",
        "| --- " * (len(metrics) + 2) + "|",
    ]
    for name in dict.fromkeys(r["estimator"] for r in rows):
        mine = {r["metric"]: r for r in rows if r["estimator"] == name}
        cells = [_difference(mine[m], 3 if m.endswith("_snr") else 2) for m in metrics]
        seeds = mine[metrics[0]]["seeds"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return "\n".join(lines)


def _slope_cell(row: dict[str, Any]) -> str:
    if not finite(row["slope"]):
        return "—"
    if not finite(row["se"]):
        return f"{row['slope']:+.2f} ({row['points']} points: no standard error)"
    return f"{row['slope']:+.2f} ± {row['high'] - row['slope']:.2f} (SE {row['se']:.2f})"


def slopes_table(c: Comparison) -> str:
    """The fitted log-log slopes of the SNR against K (and M) beside the predictions."""
    if not c.snr_slopes:
        return ""
    lines = [
        "| estimator | network | SNR against | at | fitted slope ± 95% CI (SE) | "
        "predicted slope | prediction from |",
        "| --- " * 7 + "|",
    ]
    for row in c.snr_slopes:
        fixed = ", ".join(
            f"{'K' if k == 'particles' else 'M'}={v}" for k, v in row["fixed"].items()
        )
        varied = f"{row['varied']} = {', '.join(str(v) for v in row['values'])}"
        predicted = "—" if row["predicted"] is None else f"{row['predicted']:+.1f}"
        lines.append(
            f"| {row['estimator']} | {row['group']} | {varied} | {fixed or '—'} | "
            f"{_slope_cell(row)} | {predicted} | {row['source'] or '—'} |"
        )
    return "\n".join(lines)


def _budget_paragraph(c: Comparison) -> str:
    train = c.config["train"]
    b = c.budget
    kind = b["kind"]
    if kind == "samples":
        each = "; ".join(
            f"{name} {e['samples_per_step']} per step, "
            + (f"{e['max_steps']} steps" if e["max_steps"] else f"{e['epochs']} epochs")
            for name, e in b["estimators"].items()
        )
        shared = (
            f"the same number of samples of z per data point, {b['samples_per_point']} "
            f"({train['epochs']} epochs of K = {train['particles']}): an estimator drawing s "
            f"samples per data point and step (K, or M x K with outer samples M) takes "
            f"floor({b['steps']} x {train['particles']} / s) steps ({each})"
        )
    elif kind == "seconds":
        shared = (
            f"the same wall-clock training time, {b['seconds']:g} s per run (per-epoch "
            f"evaluations not counted; at most {train['epochs']} epochs), K = "
            f"{train['particles']}; the steps each run reached are in the table, with its "
            f"CPU time: wall time depends on the machine's load, so this budget is only as "
            f"even as the load was"
        )
    else:
        shared = (
            f"the same number of gradient steps, {b.get('steps', c.summary[0]['steps'])} "
            f"({train['epochs']} epochs, batch {train['batch_size']}), K = "
            f"{train['particles']} samples per data point"
        )
    return (
        f"Budget: {kind}. Every estimator trained from the same initial parameters (per "
        f"seed) with the same data order and {shared}; Adam {train['lr']:g}, batch "
        f"{train['batch_size']}; {c.repeats} seed(s). {interval_note(c.repeats, c.ci_level)}. "
        f"Test log p(x): importance sampled, K = {c.eval_samples}, {c.eval_points} test "
        f"points. Gradient statistics: {c.grad_draws} draws at each model's final "
        f"parameters on {c.grad_batch} test points; SNR is the mean over parameters of "
        f"|mean| / std. 'own objective − log p(x)' is each estimator's own objective on the "
        f"test set minus log p(x): a lower bound must be ≤ 0 (up to Monte Carlo error). "
        f"Active units: Cov_x E_q[z] > 0.01 (Burda et al.), beside the units that carry "
        f"more than 0.1 nats of KL. Wall time per epoch swings with other processes' load; "
        f"CPU time does much less."
    )


def _paired_section(c: Comparison) -> list[str]:
    table = paired_table(c)
    if not table:
        return []
    return [
        f"## Paired differences against {c.baseline}",
        "",
        f"Per seed, each estimator's metric minus {c.baseline}'s, both trained from that "
        f"seed's initial parameters with the same data order; the mean of the differences "
        f"with its {c.ci_level:.0%} Student-t interval (n - 1 degrees of freedom); bold "
        f"where the interval excludes 0. SNRs are each model's own estimator at its own "
        f"final parameters.",
        "",
        table,
        "",
    ]


def _slopes_section(c: Comparison) -> list[str]:
    table = slopes_table(c)
    if not table:
        return []
    snr = c.snr_versus_particles
    return [
        "## Gradient SNR against K and M",
        "",
        f"At the {snr['parameters_of']}-trained parameters (first seed), {c.grad_draws} "
        f"gradient draws per point on {c.grad_batch} test points: the least-squares slope "
        f"of log SNR against log K (or log M, the outer samples), with its {c.ci_level:.0%} "
        f"interval from the fit's residuals (t with points − 2 degrees of freedom) and its "
        f"standard error, beside the slope Rainforth et al. (2018) predict for large K.",
        "",
        table,
        "",
    ]


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
    """``comparison.md``: the budget, the summary table, the paired differences, the SNR
    slopes, the bounds, the plots with their captions, the command."""
    captions = figure_captions(c)
    lines = [
        f"# Estimator comparison: {c.config['data']['dataset']}",
        "",
        _budget_paragraph(c),
        "",
        *_warnings(c),
        markdown_table(
            c.summary, c.eval_samples, c.ais_steps, _flagged(c), budget=c.budget["kind"]
        ),
        "",
        *_paired_section(c),
        *_slopes_section(c),
        *_bounds_section(c),
        "## Plots",
        "",
    ]
    for p in plots:
        lines += [f"![{p.stem}](plots/{p.name})", "", f"*{captions.get(p.stem, p.stem)}*", ""]
    if c.command:
        lines += ["## Reproduce", "", "```", c.command, "```", ""]
    return "\n".join(lines)


def figure_captions(c: Comparison) -> dict[str, str]:
    """One caption per figure (by file stem), saying what was run and measured."""
    band = (
        f"bands and bars: {c.ci_level:.0%} t-intervals over the {c.repeats} seeds"
        if c.repeats > 1
        else "n=1, no interval"
    )
    snr = c.snr_versus_particles
    bounds = next(iter(c.bounds_versus_particles.values()), {})
    return {
        "learning_curves": f"Test ELBO during training ({run_words(c)}; {band}).",
        "snr_vs_k": (
            f"Mean gradient SNR |mean|/std against K at the {snr['parameters_of']}-trained "
            f"parameters (first seed; {c.grad_draws} draws on {c.grad_batch} test points); "
            f"legend: fitted log-log slope ± 95% CI and Rainforth et al.'s prediction; "
            f"points of different estimators at one K are drawn slightly apart."
        ),
        "snr_vs_m": (
            f"Mean gradient SNR against the outer samples M at K = "
            f"{c.config['train']['particles']} ({snr['parameters_of']}-trained parameters, "
            f"first seed; {c.grad_draws} draws)."
        ),
        "gradient_variance": (
            f"Each trained model's own gradient at its final parameters: total variance "
            f"(trace of the covariance) and mean SNR ({run_words(c)}; {c.grad_draws} draws; "
            f"{band}; an interval reaching 0 is cut at the axis on the log scale)."
        ),
        "paired_differences": (
            f"Paired differences against {c.baseline} (same seed, initial parameters and "
            f"data order; {run_words(c)}; {band}); dashed: no difference."
        ),
        "bounds_vs_k": (
            f"L_K of each first-seed model on {c.bound_points} test points; dotted: its log "
            f"p(x), importance sampled with K = {bounds.get('log_likelihood_samples', '?')}."
        ),
    }
