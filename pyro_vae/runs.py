"""Run folders: what ``pyro-vae train``, ``evaluate`` and ``sample`` read and write.

A run folder holds ``config.json`` (resolved), ``metrics.jsonl`` (one JSON object per
epoch), ``checkpoint.pt`` (latest; ``best.pt`` with early stopping), ``evaluation.json``,
``plots/*.png`` and ``report.md``. Every input is validated before anything is written.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import UserInputError

RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "best.pt",
    "evaluation.json",
    "report.md",
    "plots",
    ".checkpoint.pt.tmp",
    ".best.pt.tmp",
    ".metrics.jsonl.tmp",
)


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber anything: explain what is there and which flag to pass."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file: pass a folder for the run")
    if resume and overwrite:
        raise UserInputError(
            "--resume continues the run in --out and --overwrite deletes it: pass one of them"
        )
    if resume:
        if not (out / "checkpoint.pt").is_file() or not (out / "config.json").is_file():
            raise UserInputError(
                f"--resume: {out} holds no run to resume (config.json and checkpoint.pt "
                f"missing): train without --resume first"
            )
        return
    if not out.exists() or not any(out.iterdir()):
        return
    is_run = (out / "checkpoint.pt").exists() or (out / "config.json").exists()
    if overwrite:
        if is_run:
            return
        raise UserInputError(
            f"{out} is not empty and is not a pyro-vae run folder: --overwrite replaces runs "
            f"only; choose a new or empty folder"
        )
    if (out / "checkpoint.pt").exists():
        # report.md is written last: without it the run (or its evaluation) is unfinished
        finished = (out / "report.md").exists()
        state = "a finished run" if finished else "an unfinished run"
        hint = "" if finished else " or --resume to continue it"
        raise UserInputError(
            f"{out} holds {state}: pass --overwrite to replace it{hint}, or choose another --out"
        )
    raise UserInputError(f"{out} is not empty: choose a new folder, or pass --overwrite")


def clear_run_dir(out: Path) -> None:
    """Remove the files a run writes (and nothing else) before starting over."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def load_run(run_dir: str | Path, device: str = "cpu", best: bool = True):
    """Config, model (with trained parameters), data and checkpoint of a run folder."""
    import torch

    from .checkpoint import load_checkpoint
    from .data import load_data
    from .model import build_vae

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserInputError(
            f"run folder {run_dir} does not exist: pass the --out of a training run"
        )
    config = RunConfig.load(run_dir / "config.json") if (run_dir / "config.json").exists() else None
    if config is None:
        raise UserInputError(f"{run_dir} has no config.json: is it a pyro-vae run folder?")
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    if best and checkpoint.get("stopped_early") and (run_dir / "best.pt").exists():
        checkpoint = load_checkpoint(run_dir / "best.pt")
    data = load_data(
        config.data.dataset,
        config.data.data_dir,
        config.data.binarize,
        config.data.validation_size,
        seed=config.train.seed,
        limit=config.data.limit,
    )
    vae = build_vae(config.model, data.data_shape)
    try:
        vae.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise UserInputError(
            f"the checkpoint in {run_dir} does not fit its config.json "
            f"({str(error).splitlines()[0][:100]}): was config.json edited?"
        ) from None
    vae.to(device).eval()
    torch.set_grad_enabled(True)
    return config, vae, data, checkpoint


def environment() -> dict[str, Any]:
    import pyro
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(terse=True),
    }


def command_line(argv: list[str] | None) -> str:
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return "pyro-vae " + shlex.join(args)


def write_plots(run_dir: Path, vae, data, epochs: list[dict[str, Any]]) -> list[Path]:
    from . import plots

    folder = run_dir / "plots"
    images = data.evaluation_images("test")
    extra = []
    if len(plots.kl_sites(epochs)) > 1:
        extra.append(plots.plot_kl_per_layer(epochs, folder / "kl_per_layer.png"))
    return extra + [
        plots.plot_learning_curves(epochs, folder / "learning_curves.png"),
        plots.plot_reconstructions(vae, images, folder / "reconstructions.png"),
        plots.plot_samples(vae, folder / "samples.png"),
        plots.plot_latent_space(vae, images[:2000], data.test.labels[:2000], folder / "latent.png"),
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_report(
    run_dir: Path,
    config: RunConfig,
    epochs: list[dict[str, Any]],
    evaluation: dict[str, Any] | None,
    command: str,
    plot_paths: list[Path],
    stopped_early: bool = False,
    best_epoch: int | None = None,
) -> Path:
    """``report.md``: what was trained, the numbers, the plots, and how to reproduce it.

    After early stopping the summary shows the best epoch, whose parameters the model
    (and its evaluation) holds."""
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
        k = evaluation["importance_samples"]
        lines += [
            f"| test log-likelihood, importance sampled, K={k} | "
            f"{_fmt(evaluation['test_log_likelihood'])} "
            f"(+/- {evaluation['test_log_likelihood_sem']:.3f} s.e.m.) |",
            f"| test NLL (positive) | {_fmt(evaluation['test_nll'])} |",
            f"| log p(x) - ELBO (posterior KL gap) | "
            f"{_fmt(evaluation['gap_log_likelihood_minus_elbo'])} |",
            f"| active units (Cov_x E_q[z] > 0.01) | {evaluation['active_units']} of "
            f"{evaluation['latent_dims']} |",
            f"| PSIS k-hat: mean / max / share > 0.7 | {evaluation['khat_mean']:.2f} / "
            f"{evaluation['khat_max']:.2f} / {evaluation['khat_share_above_0.7']:.1%} |",
        ]
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
    for e in epochs:
        lines.append(
            f"| {e['epoch']} | {e['train_elbo']:.3f} | {e['test_elbo']:.3f} | "
            f"{e['test_expected_log_likelihood']:.3f} | {e['test_kl']:.3f} | {e['seconds']:.2f} |"
        )
    env = environment()
    lines += [
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
    path = run_dir / "report.md"
    from .checkpoint import atomic_write_text  # the finished-run marker: written whole

    atomic_write_text("\n".join(lines), path)
    return path
