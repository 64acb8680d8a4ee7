"""The figures of a Comparison (PNG): learning curves, SNR against K and M, gradient
variance, paired differences, bounds against K; with their styles and log axes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pyro_vae.analysis.comparison import Comparison, t_quantile


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


#: the paired table's metrics and their headings
PAIRED_HEADINGS = {
    "test_log_likelihood": "Δ test log p(x)",
    "test_elbo": "Δ test ELBO",
    "encoder_snr": "Δ encoder SNR",
    "decoder_snr": "Δ decoder SNR",
}


def budget_words(c: Comparison) -> str:
    """The budget in a few words, for titles: "equal steps (20)", ..."""
    b = c.budget
    if b["kind"] == "samples":
        return f"equal samples ({b['samples_per_point']} of z per data point)"
    if b["kind"] == "seconds":
        return f"equal time ({b['seconds']:g} s training per run)"
    return f"equal steps ({b.get('steps', c.summary[0]['steps'])})"


def run_words(c: Comparison) -> str:
    """What was run, for captions: data, K, budget, seeds."""
    train = c.config["train"]
    return (
        f"{c.config['data']['dataset']}, K = {train['particles']}, {budget_words(c)}, "
        f"{c.repeats} seed(s)"
    )


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
    ax.set_title(f"Test ELBO during training\n{run_words(c)}; {band}", fontsize=10)
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
    if fit is None or not finite(fit["slope"]):
        return name
    text = f"{name}: slope {fit['slope']:+.2f}"
    if finite(fit["se"]):
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
        f"{run_words(c)}; {band}",
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
            half = row["half_width"] if finite(row["half_width"]) else None
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
        f"Paired differences against {c.baseline} (ticks: single seeds; {band})\n{run_words(c)}",
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
