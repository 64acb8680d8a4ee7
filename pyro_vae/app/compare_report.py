"""Rendering a :class:`~pyro_vae.analysis.comparison.Comparison`: ``comparison.json``,
``.csv``, ``.md``, the plots and the console lines. Everything here takes the data and
computes nothing."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from pyro_vae.analysis.comparison import Comparison, t_quantile
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
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _pm(row: dict[str, Any], field: str, digits: int = 2, general: bool = False) -> str:
    """``mean ± h``, h the half-width of the 95% t-interval over the seeds (none for one
    seed, or a row without one)."""
    value, half = row[field], row.get(f"{field}_ci")
    text = f"{value:.3g}" if general else f"{value:.{digits}f}"
    if row.get("repeats", 1) > 1 and _finite(half):
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


#: the paired table's metrics and their headings
PAIRED_HEADINGS = {
    "test_log_likelihood": "Δ test log p(x)",
    "test_elbo": "Δ test ELBO",
    "encoder_snr": "Δ encoder SNR",
    "decoder_snr": "Δ decoder SNR",
}


def _difference(row: dict[str, Any], digits: int) -> str:
    mean = row["mean"]
    if not _finite(mean):
        return "—"
    if row["n"] < 2 or not _finite(row["half_width"]):
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
    if not _finite(row["slope"]):
        return "—"
    if not _finite(row["se"]):
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


def budget_words(c: Comparison) -> str:
    """The budget in a few words, for titles: "equal steps (20)", ..."""
    b = c.budget
    if b["kind"] == "samples":
        return f"equal samples ({b['samples_per_point']} of z per data point)"
    if b["kind"] == "seconds":
        return f"equal time ({b['seconds']:g} s training per run)"
    return f"equal steps ({b.get('steps', c.summary[0]['steps'])})"


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


def _run_words(c: Comparison) -> str:
    """What was run, for captions: data, K, budget, seeds."""
    train = c.config["train"]
    return (
        f"{c.config['data']['dataset']}, K = {train['particles']}, {budget_words(c)}, "
        f"{c.repeats} seed(s)"
    )


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
        "learning_curves": f"Test ELBO during training ({_run_words(c)}; {band}).",
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
            f"(trace of the covariance) and mean SNR ({_run_words(c)}; {c.grad_draws} draws; "
            f"{band}; an interval reaching 0 is cut at the axis on the log scale)."
        ),
        "paired_differences": (
            f"Paired differences against {c.baseline} (same seed, initial parameters and "
            f"data order; {_run_words(c)}; {band}); dashed: no difference."
        ),
        "bounds_vs_k": (
            f"L_K of each first-seed model on {c.bound_points} test points; dotted: its log "
            f"p(x), importance sampled with K = {bounds.get('log_likelihood_samples', '?')}."
        ),
    }


# ------------------------------------------------------------------ plots
#: line style and marker of the i-th estimator (with the colour C{i}): told apart in
#: black and white too
STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P"),
          ("-.", "X"), (":", "*"), ("-", "h"), ("--", "<"))  # fmt: skip
#: print resolution of the comparison's figures
DPI = 200


def _style(index: int) -> dict[str, Any]:
    line, marker = STYLES[index % len(STYLES)]
    return {"color": f"C{index % 10}", "linestyle": line, "marker": marker}


def _indices(c: Comparison) -> dict[str, int]:
    """Each estimator's style index: the compared ones in order, then any other the
    SNR study measured."""
    names = list(c.estimators)
    names += [r["estimator"] for r in c.snr_versus_particles["rows"] if r["estimator"] not in names]
    return {name: i for i, name in enumerate(dict.fromkeys(names))}


def _plain_number(value: float, _position: Any = None) -> str:
    """A tick label as a plain number (0.5, 20, 3000), in e-notation only outside
    [0.001, 100000)."""
    if not value > 0:
        return ""
    if 1e-3 <= value < 1e5:
        return f"{value:g}"
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def plain_log_axis(ax: Any, which: str = "y") -> None:
    """A log axis whose ticks are plain numbers at 1, 2, 5 x 10^n (1..9 over less than
    a decade, decades alone over more than three), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    low, high = ax.get_ylim() if which == "y" else ax.get_xlim()
    decades = math.log10(high / low) if low > 0 and high > low else 1.0
    subs: tuple[float, ...] = (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    if decades < 0.8:
        subs = tuple(float(v) for v in range(1, 10))
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(_plain_number))
    axis.set_minor_formatter(NullFormatter())


def _spread(x: float, index: int, count: int, log: bool = True) -> float:
    """``x`` moved a little (6% per estimator on a log axis) so that points of several
    estimators at one x are all visible."""
    shift = 0.06 * (index - (count - 1) / 2)
    return x * (1 + shift) if log else x + shift


def _interval(values: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the mean and the half-width of its t-interval (NaN for one row)."""
    mean = values.mean(0)
    n = values.shape[0]
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    half = t_quantile(level, n - 1) * values.std(0, ddof=1) / math.sqrt(n)
    return mean, half


def write_plots(folder: Path, c: Comparison) -> list[Path]:
    """The figures of a comparison, one PNG each at :data:`DPI`, in ``folder``."""
    from pyro_vae.app.plots import _pyplot

    plt = _pyplot()
    paths = [_learning_curves(plt, folder, c), _snr_against_k(plt, folder, c)]
    if any(r.get("varied") == "M" for r in c.snr_versus_particles["rows"]):
        paths.append(_snr_against_m(plt, folder, c))
    paths.append(_gradient_variance(plt, folder, c))
    if c.paired_differences:
        paths.append(_paired_differences(plt, folder, c))
    paths.append(_bounds_against_k(plt, folder, c))
    return paths


def _learning_x(c: Comparison, run: dict[str, Any]) -> tuple[list[float], str]:
    """The x of a run's learning curve under the comparison's budget, and its label."""
    per_epoch = c.budget.get("steps_per_epoch")
    history = run["history"]
    if c.budget["kind"] == "samples" and per_epoch:
        samples = run.get("samples_per_step", run["particles"])
        return (
            [e["step"] / per_epoch * samples for e in history],
            "samples of z per data point (equal-samples budget)",
        )
    if c.budget["kind"] == "seconds":
        return (
            list(np.cumsum([e["seconds"] for e in history])),
            "training seconds, wall clock (equal-time budget; mean over seeds)",
        )
    if per_epoch:
        return [e["step"] / per_epoch for e in history], "epoch (equal number of gradient steps)"
    return [e["epoch"] for e in history], "epoch (equal number of gradient steps)"


def _learning_curves(plt: Any, folder: Path, c: Comparison) -> Path:
    from matplotlib.ticker import MaxNLocator

    from pyro_vae.app.plots import _save

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = _indices(c)
    label = "epoch"
    for name in c.estimators:
        runs = [r for r in c.runs if r["estimator"] == name]
        length = min(len(r["history"]) for r in runs)  # (equal but for the seconds budget)
        xs = np.array([_learning_x(c, r)[0][:length] for r in runs])
        label = _learning_x(c, runs[0])[1]
        values = np.array([[e["test_elbo"] for e in r["history"][:length]] for r in runs])
        mean, half = _interval(values, c.ci_level)
        x = xs.mean(0)
        style = _style(styles[name])
        ax.plot(x, mean, label=name, markevery=max(1, length // 12), markersize=5, **style)
        if np.isfinite(half).all():
            ax.fill_between(x, mean - half, mean + half, color=style["color"], alpha=0.15, lw=0)
    if c.budget["kind"] == "steps":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)
    ax.set_ylabel("test ELBO (nats per data point)")
    band = f"band: {c.ci_level:.0%} t-interval" if c.repeats > 1 else "n=1, no interval"
    ax.set_title(f"Test ELBO during training\n{_run_words(c)}; {band}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, folder / "learning_curves.png", dpi=DPI)


def _slope_label(c: Comparison, name: str, group: str, varied: str) -> str:
    fit = next(
        (
            s
            for s in c.snr_slopes
            if s["estimator"] == name and s["group"] == group and s["varied"] == varied
        ),
        None,
    )
    if fit is None or not _finite(fit["slope"]):
        return name
    text = f"{name}: slope {fit['slope']:+.2f}"
    if _finite(fit["se"]):
        text += f" ± {fit['high'] - fit['slope']:.2f}"
    if fit["predicted"] is not None:
        text += f" (theory {fit['predicted']:+.1f})"
    return text


def _snr_panels(
    plt: Any, c: Comparison, varied: str, key: str, xlabel: str, title: str, path: Path
) -> Path:
    from pyro_vae.app.plots import _save

    rows = [r for r in c.snr_versus_particles["rows"] if r.get("varied", "K") == varied]
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    styles = _indices(c)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for group, ax in zip(("encoder", "decoder"), axes):
        for position, name in enumerate(names):
            mine = [r for r in rows if r["estimator"] == name]
            xs = [_spread(r[key], position, len(names)) for r in mine]
            ys = [r.get(f"{group}_snr", np.nan) for r in mine]
            style = _style(styles[name])
            ax.plot(xs, ys, label=_slope_label(c, name, group, varied), markersize=6, **style)
            prediction = next(
                (
                    s["predicted"]
                    for s in c.snr_slopes
                    if s["estimator"] == name and s["group"] == group and s["varied"] == varied
                ),
                None,
            )
            if prediction is not None and np.isfinite(ys[0]) and ys[0] > 0:
                x0 = mine[0][key]
                grid = np.array([r[key] for r in mine], dtype=float)
                ax.plot(grid, ys[0] * (grid / x0) ** prediction, color=style["color"], lw=0.8,
                        ls=":", alpha=0.6)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain_log_axis(ax, "x")
        plain_log_axis(ax, "y")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean SNR |mean| / std")
        ax.set_title(f"{group} gradient SNR {title}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title="thin dotted: predicted slope", title_fontsize=7)
    snr = c.snr_versus_particles
    fig.suptitle(
        f"{c.config['data']['dataset']}: at the {snr['parameters_of']}-trained parameters "
        f"(first seed), {c.grad_draws} gradient draws on {c.grad_batch} test points",
        fontsize=10,
    )
    return _save(fig, path, dpi=DPI)


def _snr_against_k(plt: Any, folder: Path, c: Comparison) -> Path:
    return _snr_panels(
        plt, c, "K", "particles", "K (particles)", "against K", folder / "snr_vs_k.png"
    )


def _snr_against_m(plt: Any, folder: Path, c: Comparison) -> Path:
    k = c.config["train"]["particles"]
    return _snr_panels(
        plt, c, "M", "outer", "M (outer samples)", f"against M, K={k}", folder / "snr_vs_m.png"
    )


def _gradient_variance(plt: Any, folder: Path, c: Comparison) -> Path:
    from pyro_vae.app.plots import _save

    styles = _indices(c)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    positions = np.arange(len(c.estimators))
    for row, (field, what) in enumerate(
        (("variance", "total variance (trace of covariance)"), ("snr_mean", "mean SNR"))
    ):
        for group, ax in zip(("encoder", "decoder"), axes[row]):
            values = [
                np.array(
                    [
                        r["gradients"].get(group, {}).get(field, np.nan)
                        for r in c.runs
                        if r["estimator"] == name
                    ],
                    dtype=float,
                )
                for name in c.estimators
            ]
            means, halves = zip(*(_interval(v[None].T, c.ci_level) for v in values))
            means_a = np.array([m[0] for m in means])
            halves_a = np.array([h[0] for h in halves])
            colours = [_style(styles[n])["color"] for n in c.estimators]
            hatches = ["", "//", "..", "xx", "\\\\", "--", "++", "oo", "**", "||"]
            bars = ax.bar(positions, means_a, color=colours, alpha=0.85, edgecolor="black", lw=0.6)
            for index, bar in enumerate(bars):
                bar.set_hatch(hatches[index % len(hatches)])
            if np.isfinite(halves_a).any():
                ax.errorbar(positions, means_a, yerr=np.nan_to_num(halves_a), fmt="none",
                            ecolor="black", capsize=4, lw=1)  # fmt: skip
            ax.set_xticks(positions, c.estimators, rotation=30)
            ax.set_yscale("log")
            plain_log_axis(ax, "y")
            ax.set_title(f"{group} gradient: {what}", fontsize=10)
            ax.grid(alpha=0.3, axis="y")
    band = f"bars: {c.ci_level:.0%} t-intervals" if c.repeats > 1 else "n=1, no interval"
    fig.suptitle(
        f"Each model's own gradient at its final parameters ({c.grad_draws} draws)\n"
        f"{_run_words(c)}; {band}",
        fontsize=10,
    )
    return _save(fig, folder / "gradient_variance.png", dpi=DPI)


def _paired_differences(plt: Any, folder: Path, c: Comparison) -> Path:
    from pyro_vae.app.plots import _save

    metrics = list(dict.fromkeys(r["metric"] for r in c.paired_differences))
    names = list(dict.fromkeys(r["estimator"] for r in c.paired_differences))
    styles = _indices(c)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(names) + 2.4))
    axes = np.atleast_1d(axes)
    for metric, ax in zip(metrics, axes):
        for position, name in enumerate(names):
            row = next(
                r for r in c.paired_differences if r["estimator"] == name and r["metric"] == metric
            )
            style = _style(styles[name])
            half = row["half_width"] if _finite(row["half_width"]) else None
            ax.errorbar(row["mean"], position, xerr=half, fmt=style["marker"],
                        color=style["color"], capsize=4, markersize=6)  # fmt: skip
            ax.plot(row["differences"], [position] * len(row["differences"]), "|",
                    color=style["color"], alpha=0.5, markersize=8)  # fmt: skip
        ax.axvline(0, color="grey", ls="--", lw=1)
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.invert_yaxis()
        ax.set_title(PAIRED_HEADINGS.get(metric, metric), fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    band = f"{c.ci_level:.0%} t-intervals" if c.repeats > 1 else "n=1, no interval"
    fig.suptitle(
        f"Paired differences against {c.baseline} (ticks: single seeds; {band})\n{_run_words(c)}",
        fontsize=10,
    )
    return _save(fig, folder / "paired_differences.png", dpi=DPI)


def _bounds_against_k(plt: Any, folder: Path, c: Comparison) -> Path:
    from pyro_vae.app.plots import _save

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = _indices(c)
    count = len(c.bounds_versus_particles)
    samples = None
    for position, (name, b) in enumerate(c.bounds_versus_particles.items()):
        style = _style(styles.get(name, position))
        xs = [_spread(k, position, count) for k in b["particles"]]
        ax.plot(xs, b["bound_means"], label=f"L_K, {name}", markersize=6, **style)
        ax.axhline(b["log_likelihood"], color=style["color"], ls=":", lw=1)
        samples = b.get("log_likelihood_samples", samples)
        if name == "penalty":
            ax.axhline(b["penalty_objective"], color=style["color"], ls="--", lw=1.5,
                       label="penalty objective (penalty model)")  # fmt: skip
    ax.set_xscale("log")
    plain_log_axis(ax, "x")
    ax.set_xlabel("K")
    ax.set_ylabel("nats per data point")
    ax.set_title(
        f"L_1 (ELBO) ≤ L_K ≤ log p(x), first seed's models, {c.bound_points} test points\n"
        f"dotted: log p(x), importance sampled with K={samples}",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, folder / "bounds_vs_k.png", dpi=DPI)
