"""Comparing estimators: gradient variance and SNR, bound tightness, equal-budget training.

- :func:`gradient_draws` / :func:`gradient_statistics`: M gradient estimates with fresh
  noise at fixed parameters and a fixed mini-batch; per parameter group (encoder: the
  guide's parameters, decoder: the model's) the total variance, the mean per-parameter
  signal-to-noise ratio ``|mean| / std`` (Rainforth et al., "Tighter Variational Bounds
  are Not Necessarily Better", 2018) and, given a reference gradient, the bias.
- :func:`bound_tightness`: per data point L_1 (the ELBO), L_K for several K, the
  importance-sampled log p(x), their gaps, and the penalty objective next to them.
- :func:`compare_estimators`: trains one model per estimator from the same initial
  parameters, data order and number of steps, evaluates all with the same K, and
  writes ``comparison.json``, ``.csv``, ``.md`` and plots.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vae.analysis.bounds import bound_tightness
from pyro_vae.analysis.gradients import estimator_gradient_statistics, snr_versus_particles
from pyro_vae.errors import UserInputError
from pyro_vae.io import atomic_write_json, atomic_write_text
from pyro_vae.objectives.registry import ESTIMATORS, check_estimator_fits, make_elbo


# ------------------------------------------------------------------ equal-budget training
def parse_estimators(text: str | Sequence[str]) -> list[str]:
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise UserInputError(
            f"unknown estimator(s) {', '.join(unknown) or '(none given)'}: choose from "
            f"{', '.join(ESTIMATORS)}"
        )
    if len(set(names)) != len(names):
        raise UserInputError(f"an estimator is listed twice in {', '.join(names)}")
    return names


def check_estimators_run(
    vae, x: torch.Tensor, estimators: Sequence[str], particles: int, alpha: float
) -> None:
    """Run each estimator once on a small batch: a clear error now, not mid-comparison."""
    for name in estimators:
        model = copy.deepcopy(vae)
        try:
            check_estimator_fits(name, model)
            make_elbo(name, particles, alpha=alpha).loss_and_grads(model.model, model.guide, x)
        except UserInputError as error:
            raise UserInputError(f"estimator {name} cannot run with this model: {error}") from None
        except (ValueError, NotImplementedError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            raise UserInputError(f"estimator {name} cannot run with this model: {reason}") from None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def compare_estimators(
    config,
    estimators: Sequence[str],
    out_dir: str | Path,
    repeats: int = 1,
    eval_samples: int = 1000,
    eval_points: int | None = None,
    grad_draws: int = 100,
    grad_batch: int = 100,
    snr_particles: Sequence[int] = (1, 3, 10, 30),
    bound_particles: Sequence[int] = (1, 5, 50, 500),
    bound_points: int = 200,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    command: str = "",
    executor=None,
) -> dict[str, Any]:
    """Train one model per estimator and repeat, on an equal budget, and compare them.

    Every estimator starts from the same initial parameters (per repeat), sees the data
    in the same order, and takes the same number of gradient steps with the same number
    of particles K (``config.train.particles``) per data point; wall time is recorded so
    that equal-time comparisons can be read off too. Each trained model is evaluated
    with the same K (``eval_samples``) for log p(x), and its own gradient estimator is
    measured at its final parameters on a fixed mini-batch.

    Each (estimator, repeat) is one call of :func:`train_compare_run`, which trains into
    its own folder ``out_dir/runs/ESTIMATOR-seedSEED`` with checkpoints; ``executor``
    (:mod:`pyro_vae.executors`; default: serial, in this process) decides where the calls
    run. The results, tables and plots do not depend on it.
    """
    from pyro_vae.data import load_data
    from pyro_vae.models.build import build_vae

    estimators = parse_estimators(estimators)
    if repeats < 1:
        raise UserInputError(f"--repeats must be >= 1, got {repeats}")
    if config.train.seed + repeats - 1 > 2**32 - 1:
        raise UserInputError(
            f"seeds {config.train.seed} to {config.train.seed + repeats - 1} (one per repeat) "
            f"must each be at most 4294967295: lower --seed"
        )
    if eval_samples < 1:
        raise UserInputError(f"--eval-samples must be >= 1, got {eval_samples}")
    if grad_draws < 2:
        raise UserInputError(f"--grad-draws must be >= 2 (a variance needs two), got {grad_draws}")
    if min(snr_particles) < 1 or min(bound_particles) < 1:
        raise UserInputError("every K in --snr-particles and --bound-particles must be >= 1")
    train = config.train
    compile_evaluation = None if train.compile == "auto" else bool(train.compile)
    data = load_data(
        config.data.dataset,
        config.data.data_dir,
        config.data.binarize,
        config.data.validation_size,
        seed=train.seed,
        limit=config.data.limit,
    )
    test_images = data.evaluation_images("test")
    if eval_points is not None:
        test_images = test_images[:eval_points]
    torch.manual_seed(train.seed)
    probe = build_vae(config.model, data.data_shape)
    probe.check_data(test_images, "the test set")
    check_estimators_run(probe, test_images[:8], estimators, train.particles, train.alpha)
    grad_batch_images = test_images[: min(grad_batch, len(test_images))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    runs_dir = out / "runs"
    if executor is None:
        from pyro_vae.app.executors import SerialExecutor

        executor = SerialExecutor()
    specs, labels = [], []
    for repeat in range(repeats):
        seed = train.seed + repeat
        for name in estimators:
            run_config = dataclasses.replace(
                config, train=dataclasses.replace(train, estimator=name, seed=seed)
            )
            specs.append(
                {
                    "config": run_config.to_dict(),
                    "data_seed": train.seed,
                    "repeat": repeat,
                    "run_dir": str(runs_dir / f"{name}-seed{seed}"),
                    "eval_samples": eval_samples,
                    "eval_points": eval_points,
                    "grad_draws": grad_draws,
                    "grad_batch": grad_batch,
                    "compile_evaluation": compile_evaluation,
                    "keep_parameters": repeat == 0,
                    "progress": progress and executor.name == "serial",
                }
            )
            labels.append(f"{name}, repeat {repeat + 1}/{repeats} (K={train.particles})")
    for spec in specs:  # an earlier comparison's run of the same name: this one starts afresh
        if Path(spec["run_dir"]).is_dir():
            shutil.rmtree(spec["run_dir"])
    if log is not None:
        log(f"training {len(specs)} runs ({executor.name}) ...")
    started = time.perf_counter()
    runs = executor.map(train_compare_run, specs, log=log, labels=labels)
    runs_wall_seconds = time.perf_counter() - started
    trained: dict[str, Any] = {}
    for run in runs:
        parameters = run.pop("parameters", None)
        if parameters is not None:
            vae = build_vae(config.model, data.data_shape)
            vae.load_state_dict(parameters)
            trained[run["estimator"]] = vae
        if log is not None:
            evaluation = run["evaluation"]
            log(
                f"{run['estimator']} (seed {run['seed']}): test ELBO "
                f"{evaluation['test_elbo']:.3f}, log p(x) {evaluation['test_log_likelihood']:.3f} "
                f"(K={eval_samples}), own objective {run['test_objective']:.3f}, "
                f"{run['seconds_per_epoch']:.2f} s/epoch"
            )

    summary = _summarise(runs, estimators)
    # SNR against K and bound against K, at the parameters of the first repeat's models
    reference_name = next((n for n in ("iwae", "dreg", "mc") if n in trained), estimators[0])
    snr_estimators = [n for n in ("iwae", "dreg") if n in estimators] or ["iwae", "dreg"]
    if log is not None:
        log(f"SNR against K at the {reference_name}-trained parameters ...")
    snr_rows = snr_versus_particles(
        trained[reference_name],
        grad_batch_images,
        snr_estimators,
        snr_particles,
        grad_draws,
        seed=train.seed,
    )
    if log is not None:
        log("bounds against K ...")
    bounds = {}
    for name, vae in trained.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train.seed)
            bounds[name] = bound_tightness(
                vae, test_images[:bound_points], bound_particles, eval_samples
            )
            bounds[name].pop("per_point")

    result = {
        "command": command,
        "config": config.to_dict(),
        "estimators": estimators,
        "repeats": repeats,
        "eval_samples": eval_samples,
        "eval_points": int(len(test_images)),
        "bound_points": int(len(test_images[:bound_points])),
        "grad_draws": grad_draws,
        "grad_batch": int(len(grad_batch_images)),
        "executor": executor.name,
        "runs_wall_seconds": runs_wall_seconds,
        "summary": summary,
        "snr_versus_particles": {"parameters_of": reference_name, "rows": snr_rows},
        "bounds_versus_particles": bounds,
        "runs": runs,
    }
    atomic_write_json(result, out / "comparison.json")
    _write_csv(out / "comparison.csv", summary)
    plots = _plots(out, runs, estimators, snr_rows, reference_name, bounds)
    _write_markdown(out / "comparison.md", result, plots)
    return result


@functools.lru_cache(maxsize=2)
def _cached_data(dataset, data_dir, binarize, validation_size, seed, limit):
    """Runs in one process (serial, or a reused Ray worker) read the data once."""
    from pyro_vae.data import load_data

    return load_data(dataset, data_dir, binarize, validation_size, seed=seed, limit=limit)


def train_compare_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one estimator from its seed's initial parameters, evaluate and measure it.

    ``spec`` is plain data (so the call can run in another process): ``config`` (a
    :class:`~pyro_vae.config.RunConfig` as a dict, with this run's estimator and seed),
    ``data_seed``, ``repeat``, ``run_dir``, ``eval_samples``, ``eval_points``,
    ``grad_draws``, ``grad_batch``, ``compile_evaluation``, ``keep_parameters`` and
    ``progress``. Training checkpoints into ``run_dir`` after every epoch and, if a
    checkpoint of the same config is there already (a retried call whose process
    died), resumes from it: the result is the same either way. Returns the run's
    record, plain numbers and lists, with ``parameters`` (the trained state dict) when
    ``keep_parameters``.
    """
    from pyro_vae.analysis.evaluation import evaluate, evaluation_mode
    from pyro_vae.config import RunConfig
    from pyro_vae.models.build import build_vae
    from pyro_vae.training.fit import fit
    from pyro_vae.training.trainer import CHECKPOINT

    config = RunConfig.from_dict(spec["config"])
    train = config.train
    seed, name = train.seed, train.estimator
    data = _cached_data(
        config.data.dataset,
        config.data.data_dir,
        config.data.binarize,
        config.data.validation_size,
        spec["data_seed"],
        config.data.limit,
    )
    test_images = data.evaluation_images("test")
    if spec["eval_points"] is not None:
        test_images = test_images[: spec["eval_points"]]
    grad_batch_images = test_images[: min(spec["grad_batch"], len(test_images))]
    progress = spec["progress"]
    run_dir = Path(spec["run_dir"])
    resumed_at = checkpoint_epoch(run_dir / CHECKPOINT, config)
    torch.manual_seed(seed)
    vae = build_vae(config.model, data.data_shape)
    started, cpu_started = time.perf_counter(), time.process_time()
    history = fit(
        vae,
        data,
        train,
        run_dir=run_dir,
        resume=resumed_at is not None,
        saved_config=config.to_dict(),
        progress=progress,
        log=None,
    )
    train_seconds = time.perf_counter() - started
    # CPU time beside wall time: wall time swings with the load of other processes
    train_cpu_seconds = time.process_time() - cpu_started
    trained_epochs = max(1, len(history) - (resumed_at or 0))
    evaluation = evaluate(
        vae,
        test_images,
        spec["eval_samples"],
        progress=progress,
        compile=spec["compile_evaluation"],
    )
    with torch.random.fork_rng(devices=[]), evaluation_mode(vae):
        torch.manual_seed(seed)
        objective = -make_elbo(name, train.particles, alpha=train.alpha).loss(
            vae.model, vae.guide, test_images
        ) / len(test_images)
        gradients = estimator_gradient_statistics(
            vae, grad_batch_images, name, train.particles, spec["grad_draws"], alpha=train.alpha
        )
    run = {
        "estimator": name,
        "repeat": spec["repeat"],
        "seed": seed,
        "particles": train.particles,
        "epochs": len(history),
        "steps": history.last["step"],
        "seconds_per_epoch": float(np.median(history["seconds"])),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "cpu_seconds_per_epoch": train_cpu_seconds / trained_epochs,
        "resumed_at_epoch": resumed_at,
        "run_dir": str(run_dir),
        "history": history.epochs,
        "test_objective": objective,
        "objective_minus_log_likelihood": objective - evaluation["test_log_likelihood"],
        "evaluation": evaluation,
        "gradients": gradients,
    }
    if spec["keep_parameters"]:
        run["parameters"] = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    return run


def checkpoint_epoch(path: Path, config) -> int | None:
    """The epoch of the checkpoint at ``path`` if there is one to resume, else ``None``.

    A checkpoint trained with another config is an error, not something to continue.
    """
    from pyro_vae.app.runs import config_differences
    from pyro_vae.training.checkpoint import load_checkpoint

    if not path.exists():
        return None
    checkpoint = load_checkpoint(path)
    changed = config_differences(checkpoint["config"], config.to_dict())
    if changed:
        raise UserInputError(
            f"{path} was trained with another config ({'; '.join(changed[:3])}): remove its "
            f"folder or choose another output folder"
        )
    return int(checkpoint["epoch"])


_SUMMARY_FIELDS = (
    ("test_elbo", lambda r: r["evaluation"]["test_elbo"]),
    ("test_log_likelihood", lambda r: r["evaluation"]["test_log_likelihood"]),
    ("test_objective", lambda r: r["test_objective"]),
    ("objective_minus_log_likelihood", lambda r: r["objective_minus_log_likelihood"]),
    ("encoder_snr", lambda r: r["gradients"].get("encoder", {}).get("snr_mean", float("nan"))),
    ("decoder_snr", lambda r: r["gradients"].get("decoder", {}).get("snr_mean", float("nan"))),
    ("encoder_variance", lambda r: r["gradients"].get("encoder", {}).get("variance", float("nan"))),
    ("decoder_variance", lambda r: r["gradients"].get("decoder", {}).get("variance", float("nan"))),
    ("shared_snr", lambda r: r["gradients"].get("shared", {}).get("snr_mean", float("nan"))),
    ("shared_variance", lambda r: r["gradients"].get("shared", {}).get("variance", float("nan"))),
    ("active_units", lambda r: r["evaluation"]["active_units"]),
    ("informative_units", lambda r: r["evaluation"].get("informative_units", float("nan"))),
    ("seconds_per_epoch", lambda r: r["seconds_per_epoch"]),
    ("cpu_seconds_per_epoch", lambda r: r.get("cpu_seconds_per_epoch", float("nan"))),
)


def _summarise(runs: list[dict[str, Any]], estimators: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for name in estimators:
        mine = [r for r in runs if r["estimator"] == name]
        row: dict[str, Any] = {
            "estimator": name,
            "repeats": len(mine),
            "particles": mine[0]["particles"],
            "epochs": mine[0]["epochs"],
            "steps": mine[0]["steps"],
        }
        for field, getter in _SUMMARY_FIELDS:
            mean, std = _mean_std([getter(r) for r in mine])
            row[field] = mean
            row[f"{field}_std"] = std
        rows.append(row)
    return rows


def _write_csv(path: Path, summary: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)


def _pm(row: dict[str, Any], field: str, digits: int = 2) -> str:
    value, std = row[field], row[f"{field}_std"]
    if row["repeats"] > 1:
        return f"{value:.{digits}f} ± {std:.{digits}f}"
    return f"{value:.{digits}f}"


def markdown_table(summary: list[dict[str, Any]], eval_samples: int | None = None) -> str:
    """The summary as a markdown table (rendering only); ``eval_samples`` is the K of its
    log p(x), named in the header."""
    k = f", K={eval_samples}" if eval_samples else ""
    lines = [
        f"| estimator | test ELBO | test log p(x){k} | own objective − log p(x) | encoder SNR | "
        "decoder SNR | encoder grad. variance | decoder grad. variance | active units | "
        "units with KL > 0.1 nats | s / epoch (wall) | CPU s / epoch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary:
        lines.append(
            f"| {row['estimator']} | {_pm(row, 'test_elbo')} | {_pm(row, 'test_log_likelihood')} | "
            f"{_pm(row, 'objective_minus_log_likelihood')} | {_pm(row, 'encoder_snr', 3)} | "
            f"{_pm(row, 'decoder_snr', 3)} | {row['encoder_variance']:.3g} | "
            f"{row['decoder_variance']:.3g} | {row['active_units']:.0f} | "
            f"{row['informative_units']:.0f} | {_pm(row, 'seconds_per_epoch')} | "
            f"{_pm(row, 'cpu_seconds_per_epoch')} |"
        )
    return "\n".join(lines)


def _write_markdown(path: Path, result: dict[str, Any], plots: list[Path]) -> None:
    config = result["config"]
    train = config["train"]
    lines = [
        f"# Estimator comparison: {config['data']['dataset']}",
        "",
        f"Equal budget: every estimator trained from the same initial parameters with the "
        f"same data order, {result['summary'][0]['steps']} gradient steps "
        f"({train['epochs']} epochs, batch {train['batch_size']}), K = {train['particles']} "
        f"samples per data point, Adam {train['lr']:g}; {result['repeats']} repeat(s) "
        f"(± is the standard deviation over repeats). Test log p(x): importance sampled, "
        f"K = {result['eval_samples']}, {result['eval_points']} test points. Gradient "
        f"statistics: {result['grad_draws']} draws at each model's final parameters on "
        f"{result['grad_batch']} test points; SNR is the mean over parameters of "
        f"|mean| / std. 'own objective − log p(x)' is each estimator's own objective on the "
        f"test set minus log p(x): a lower bound must be ≤ 0 (up to Monte Carlo error). "
        f"Active units: Cov_x E_q[z] > 0.01 (Burda et al.), beside the units that carry "
        f"more than 0.1 nats of KL. Wall time per epoch swings with other processes' load; "
        f"CPU time does much less.",
        "",
        markdown_table(result["summary"], result["eval_samples"]),
        "",
    ]
    bounds = result["bounds_versus_particles"]
    if bounds:
        ks = next(iter(bounds.values()))["particles"]
        first = next(iter(bounds.values()))
        lines += [
            f"Bounds against K (first repeat's models, nats per data point) on the first "
            f"{result['bound_points']} test points, with log p(x) estimated from "
            f"K={first['log_likelihood_samples']} samples (never fewer than the largest "
            f"bound's); the main table's log p(x) is over {result['eval_points']} points, so "
            f"the two differ by their subsets:",
            "",
            "| trained with | "
            + " | ".join(f"L_{k}" for k in ks)
            + f" | log p(x), K={first['log_likelihood_samples']} | penalty objective |",
            "| --- |" + " --- |" * (len(ks) + 2),
        ]
        for name, b in bounds.items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{v:.2f}" for v in b["bound_means"])
                + f" | {b['log_likelihood']:.2f} | {b['penalty_objective']:.2f} |"
            )
        lines.append("")
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})\n" for p in plots]
    if result["command"]:
        lines += ["## Reproduce", "", "```", result["command"], "```", ""]
    atomic_write_text("\n".join(lines), path)


def _plots(out: Path, runs, estimators, snr_rows, reference_name, bounds) -> list[Path]:
    from pyro_vae.app.plots import _pyplot, _save

    plt = _pyplot()
    folder = out / "plots"
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, name in enumerate(estimators):
        histories = [r["history"] for r in runs if r["estimator"] == name]
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
    paths.append(_save(fig, folder / "learning_curves.png"))

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
    paths.append(_save(fig, folder / "snr_vs_k.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for group, ax in zip(("encoder", "decoder"), axes):
        variances = [
            np.mean(
                [
                    r["gradients"].get(group, {}).get("variance", np.nan)
                    for r in runs
                    if r["estimator"] == name
                ]
            )
            for name in estimators
        ]
        ax.bar(estimators, variances, color=[f"C{i}" for i in range(len(estimators))])
        ax.set_yscale("log")
        ax.set_title(f"{group} gradient variance (trace of covariance)", fontsize=10)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    paths.append(_save(fig, folder / "gradient_variance.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (name, b) in enumerate(bounds.items()):
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
    paths.append(_save(fig, folder / "bounds_vs_k.png"))
    return paths
