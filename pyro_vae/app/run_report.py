"""A run folder's report: ``report.md`` (what was trained, the numbers, the plots, how
to reproduce it) and the PNG figures it shows (``plots/``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_vae.app.runs import environment
from pyro_vae.config import RunConfig

if TYPE_CHECKING:
    from pyro_vae.models.protocol import PyroModel


def write_plots(
    run_dir: Path, vae: PyroModel, data: Any, epochs: list[dict[str, Any]]
) -> list[Path]:
    """The run's PNG figures in ``run_dir/plots``: learning curves, reconstructions, prior
    samples and the latent space; returns their paths."""
    from pyro_vae.app import plots

    folder = run_dir / "plots"
    images = data.evaluation_images("test")
    extra = []
    if len(plots.kl_sites(epochs)) > 1:
        extra.append(plots.plot_kl_per_layer(epochs, folder / "kl_per_layer.png"))
    return extra + [
        plots.plot_learning_curves(epochs, folder / "learning_curves.png"),
        plots.plot_reconstructions(vae, images, folder / "reconstructions.png"),
        plots.plot_samples(vae, folder / "samples.png", example=images[:1]),
        plots.plot_latent_space(vae, images[:2000], data.test.labels[:2000], folder / "latent.png"),
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _evaluation_rows(evaluation: dict[str, Any]) -> list[str]:
    """The summary's rows of the final evaluation (log p(x), active units, k-hat)."""
    k = evaluation["importance_samples"]
    return [
        f"| test log-likelihood, importance sampled, K={k} | "
        f"{_fmt(evaluation['test_log_likelihood'])} "
        f"(+/- {evaluation['test_log_likelihood_sem']:.3f} s.e.m.) |",
        f"| test NLL (positive) | {_fmt(evaluation['test_nll'])} |",
        f"| log p(x) - ELBO (posterior KL gap) | "
        f"{_fmt(evaluation['gap_log_likelihood_minus_elbo'])} |",
        f"| active units (Cov_x E_q[z] > 0.01) | {evaluation['active_units']} of "
        f"{evaluation['latent_dims']} |",
        f"| per-unit KL: median / units above 0.1 nats | "
        f"{_fmt(evaluation.get('kl_per_unit_median'))} / "
        f"{evaluation.get('informative_units', '-')} |",
        (
            f"| PSIS k-hat: mean / max / share > 0.7 | {evaluation['khat_mean']:.2f} / "
            f"{evaluation['khat_max']:.2f} / {evaluation['khat_share_above_0.7']:.1%} |"
            if evaluation.get("khat_mean") is not None
            else f"| PSIS k-hat | {evaluation.get('khat_note', '-')} |"
        ),
    ]


def _layer_lines(last: dict[str, Any], evaluation: dict[str, Any] | None) -> list[str]:
    """Per latent layer, with several: the test KL and the active units."""
    lines: list[str] = []
    sites = sorted(k.removeprefix("test_kl_") for k in last if k.startswith("test_kl_"))
    if len(sites) > 1:
        lines += [
            "",
            "Per latent layer (last epoch; active units: Cov_x E_q[z] > 0.01):",
            "",
            "| layer | test KL | active units |",
            "| --- | --- | --- |",
        ]
        by_site = (evaluation or {}).get("active_units_by_site", {})
        for site in sites:
            units = by_site.get(site, last.get(f"test_active_units_{site}", "-"))
            lines.append(f"| {site} | {last[f'test_kl_{site}']:.3f} | {units} |")
    return lines


def _plot_and_epoch_lines(
    run_dir: Path, epochs: list[dict[str, Any]], plot_paths: list[Path], flags: Sequence[Any]
) -> list[str]:
    """The plots, then a row per epoch (an epoch a flag names is marked)."""
    lines: list[str] = []
    lines += ["", "## Plots", ""]
    for path in plot_paths:
        relative = path.relative_to(run_dir)
        lines += [f"![{path.stem}]({relative.as_posix()})", ""]
    lines += [
        "## Per epoch",
        "",
        "| epoch | train bound | test ELBO | test E[log p(x given z)] | test KL | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    flagged = {flag.where for flag in flags}
    for e in epochs:
        mark = " (warning)" if f"epoch {e['epoch']}" in flagged else ""
        lines.append(
            f"| {e['epoch']}{mark} | {e['train_elbo']:.3f} | {e['test_elbo']:.3f} | "
            f"{e['test_expected_log_likelihood']:.3f} | {e['test_kl']:.3f} | {e['seconds']:.2f} |"
        )
    return lines


def _reproduce_lines(config: RunConfig, command: str) -> list[str]:
    """How to recreate the run: the command, the environment, the resolved config."""
    env = environment()
    return [
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        f"Environment: Python {env['python']}, torch {env['torch']}, pyro {env['pyro']}, "
        f"{env['threads']} threads on {env['cpus']} CPUs ({env['machine']}).",
        "",
        "## Resolved config",
        "",
        "```json",
        json.dumps(config.to_dict(), indent=2),
        "```",
        "",
    ]


def write_report(
    run_dir: Path,
    config: RunConfig,
    epochs: list[dict[str, Any]],
    evaluation: dict[str, Any] | None,
    command: str,
    plot_paths: list[Path],
    stopped_early: bool = False,
    best_epoch: int | None = None,
    flags: Sequence[Any] = (),
) -> Path:
    """``report.md``: what was trained, the numbers, the plots, and how to reproduce it.

    After early stopping the summary shows the best epoch, whose parameters the model
    (and its evaluation) holds. ``flags`` (:class:`~pyro_vae.analysis.sanity.Flag`:
    numbers that cannot be right) come first, as warnings, and mark their epochs."""
    last = epochs[-1] if epochs else {}
    which = "last epoch"
    if stopped_early and best_epoch:
        last, which = epochs[best_epoch - 1], f"best epoch, {best_epoch}"
    seconds = sorted(e["seconds"] for e in epochs)
    median_seconds = _fmt(seconds[len(seconds) // 2]) if seconds else "-"
    lines = [
        f"# pyro-vae run: {config.data.dataset}, estimator `{config.train.estimator}`",
        "",
        "All numbers are nats per data point; ELBO and log-likelihood: higher is better.",
        "",
        *(
            ["## Warnings: numbers that cannot be right", ""]
            + [f"- **{flag.message()}**" for flag in flags]
            + [""]
            if flags
            else []
        ),
        "## Summary",
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| epochs | {len(epochs)}{' (stopped early)' if stopped_early else ''} |",
        f"| train bound (estimator's own, {which}) | {_fmt(last.get('train_elbo'))} |",
        f"| test ELBO ({which}, {last.get('test_images', 'all')} test images) | "
        f"{_fmt(last.get('test_elbo'))} |",
        f"| test E_q[log p(x given z)] | {_fmt(last.get('test_expected_log_likelihood'))} |",
        f"| test KL(q(z given x) from p(z)) | {_fmt(last.get('test_kl'))} |",
        f"| seconds per epoch (median) | {median_seconds} |",
    ]
    if evaluation:
        lines += _evaluation_rows(evaluation)
    lines += _layer_lines(last, evaluation)
    lines += _plot_and_epoch_lines(run_dir, epochs, plot_paths, flags)
    lines += _reproduce_lines(config, command)
    path = run_dir / "report.md"
    from pyro_vae.io import atomic_write_text

    atomic_write_text("\n".join(lines), path)
    return path
