"""Sweeps: one training run per point of a grid over config keys.

A grid is JSON: ``{"base": {...config sections...}, "grid": {"train.estimator": ["mc",
"analytic"], "train.seed": [0, 1]}}``. Every run is the base config with one value of
each dotted key (``section.key``), in the cartesian product of the lists, in their order.
Every run's :class:`~pyro_vae.config.RunConfig` is built and checked (data, model,
estimator, memory) before anything is written.

Each run is one call of :func:`sweep_run` on plain data: it trains into its own run
folder (``config.json``, ``checkpoint.pt``, ``metrics.jsonl``, and ``evaluation.json``
when the run's ``train.eval_samples`` asks for log p(x); the folder ``pyro-vae evaluate``
and ``sample`` read), resuming from the checkpoint there if
one of the same config exists, and returns its numbers. An executor
(:mod:`pyro_vae.app.executors`) decides where the calls run; :func:`run_sweep` gathers the
results into ``sweep.json`` and ``sweep.md``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pyro_vae.app.training_run import DataCache
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.errors import UserInputError
from pyro_vae.io import atomic_write_json, atomic_write_text, read_json

#: a grid with more runs than this is a mistake, not a sweep
MAX_RUNS = 10_000
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid: its folder name, the grid's values for it, its config."""

    name: str
    overrides: dict[str, Any]
    config: RunConfig


def load_grid(path: str | Path) -> dict[str, Any]:
    """Read a grid file; its structure is checked by :func:`expand_grid`."""
    grid: dict[str, Any] = read_json(path, "grid file")
    return grid


def expand_grid(spec: Any, source: str = "grid") -> list[SweepRun]:
    """The runs of a grid, each config validated; a bad grid is one :class:`UserInputError`."""
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict):
        raise UserInputError(
            f'{source} must be a JSON object {{"base": {{...}}, "grid": {{"section.key": '
            f"[values]}}}}"
        )
    unknown = set(spec) - {"base", "grid"}
    if unknown:
        raise UserInputError(
            f"{source} has unknown key(s) {', '.join(sorted(unknown))}: use only base and grid"
        )
    base = spec.get("base", {})
    if not isinstance(base, dict):
        raise UserInputError(f"{source}: base must be a JSON object with sections model/data/train")
    grid = spec["grid"]
    if not grid:
        raise UserInputError(f"{source}: grid is empty: give at least one key with its values")
    keys = list(grid)
    for key in keys:
        section, _, name = key.partition(".")
        known = {f.name for f in fields(_SECTIONS[section])} if section in _SECTIONS else set()
        if name not in known:
            raise UserInputError(
                f"{source}: grid key {key!r} is not section.key with a section of "
                f"{', '.join(_SECTIONS)} and one of its keys"
                + (f" ({', '.join(sorted(known))})" if known else "")
            )
        values = grid[key]
        if not isinstance(values, list) or not values:
            raise UserInputError(f"{source}: grid key {key!r} needs a non-empty list of values")
    count = 1
    for key in keys:
        count *= len(grid[key])
    if count > MAX_RUNS:
        raise UserInputError(f"{source} has {count:,} runs, more than {MAX_RUNS:,}: trim it")
    short = _short_names(keys)
    runs: list[SweepRun] = []
    seen: dict[str, str] = {}
    for index, combination in enumerate(itertools.product(*(grid[k] for k in keys))):
        overrides = dict(zip(keys, combination))
        name = f"{index:03d}-" + "_".join(
            f"{short[k]}-{_value_text(v)}" for k, v in overrides.items()
        )
        values = {
            s: dict(base.get(s, {})) if isinstance(base.get(s), dict) else base.get(s) for s in base
        }
        for key, value in overrides.items():
            section, _, field_name = key.partition(".")
            values.setdefault(section, {})
            if isinstance(values[section], dict):
                values[section][field_name] = value
        config = RunConfig.from_dict(values, source=f"{source}, run {name}")
        fingerprint = repr(sorted(_flat(config.to_dict()).items()))
        if fingerprint in seen:
            raise UserInputError(
                f"{source}: runs {seen[fingerprint]} and {name} have the same config: "
                f"remove the repeated value"
            )
        seen[fingerprint] = name
        runs.append(SweepRun(name, overrides, config))
    return runs


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """``train.seed`` -> ``seed``, unless two keys share their last part."""
    last = [k.partition(".")[2] for k in keys]
    return {k: (n if last.count(n) == 1 else k) for k, n in zip(keys, last)}


def _value_text(value: Any) -> str:
    text = "x".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)[:40]


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{key}": tuple(v) if isinstance(v, list) else v
        for section, items in values.items()
        for key, v in items.items()
    }


def check_runs(
    runs: Sequence[SweepRun], check_device: bool = True, cache: DataCache | None = None
) -> None:
    """What ``train`` checks before writing, for every run
    (:func:`~pyro_vae.app.training_run.checked_model`): the data loads and fits the
    model, the estimator fits the model, the step fits in memory (and, with
    ``check_device``, the run's device is on this machine). ``cache``: the sweep's data
    sets, read once (:func:`run_sweep` trains from them)."""
    import torch

    from pyro_vae.app.training_run import checked_model
    from pyro_vae.resources import check_device as check_run_device

    cache = cache or DataCache()
    for run in runs:
        config = run.config
        try:
            if check_device:
                check_run_device(config.train.device)
            data_set = cache.get(config.data, config.train.seed)
            with torch.random.fork_rng(devices=[]):
                checked_model(config, data_set, on_device=False)
        except UserInputError as error:
            raise UserInputError(f"run {run.name}: {error}") from None


def parameters_digest(vae: Any) -> str:
    """SHA-256 of the parameters and buffers, by name: equal digests, identical models."""
    digest = hashlib.sha256()
    for name, value in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sweep_run(
    spec: dict[str, Any],
    callbacks: Sequence[Callable[..., Any]] = (),
    cache: DataCache | None = None,
) -> dict[str, Any]:
    """Train, evaluate and summarise one run of a sweep.

    ``spec`` is plain data: ``name``, ``overrides``, ``config`` (a RunConfig as a dict),
    ``run_dir`` and ``progress``. ``callbacks`` go to :func:`~pyro_vae.training.fit`
    (called after each epoch's checkpoint). ``cache``: the sweep's data sets (else the
    data is read for this run). Returns plain numbers: the final test ELBO
    (whole test set, 10 samples of z per point), the importance-sampled log p(x) with the
    config's ``eval_samples`` and ``eval_images`` (as ``train`` does; 0 skips it), train
    time, and the parameters' digest.
    """
    import numpy as np
    import torch

    from pyro_vae.analysis.evaluation import evaluate, evaluate_elbo, fixed_subset
    from pyro_vae.app.training_run import train_in_folder
    from pyro_vae.models.protocol import forked_rng

    config = RunConfig.from_dict(spec["config"])
    run_dir = Path(spec["run_dir"])
    data_set = (cache or DataCache()).get(config.data, config.train.seed)
    vae, history, timing = train_in_folder(config, data_set, run_dir, spec["progress"], callbacks)
    images = data_set.evaluation_images("test").to(config.train.device)
    with forked_rng():
        torch.manual_seed(0)
        final = evaluate_elbo(vae, images, 10, device=config.train.device)
    result: dict[str, Any] = {
        "name": spec["name"],
        "overrides": spec["overrides"],
        "run_dir": str(run_dir),
        "epochs": len(history),
        "steps": history.last["step"],
        "test_elbo": final["elbo"],
        "test_kl": final["kl"],
        "train_seconds": timing["train_seconds"],
        "seconds_per_epoch": float(np.median(history["seconds"])),
        "resumed_at_epoch": timing["resumed_at_epoch"],
        "parameters_sha256": parameters_digest(vae),
    }
    if config.train.eval_samples:
        evaluation = evaluate(
            vae,
            fixed_subset(images, config.train.eval_images),
            config.train.eval_samples,
            progress=spec["progress"],
        )
        atomic_write_json(evaluation.to_dict(), run_dir / "evaluation.json")
        result["eval_samples"] = config.train.eval_samples
        result["test_log_likelihood"] = evaluation.test_log_likelihood
    return result


def run_sweep(
    runs: Sequence[SweepRun],
    out_dir: str | Path,
    executor: Any = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    command: str = "",
    grid: dict[str, Any] | None = None,
    run_function: Callable[[dict[str, Any]], dict[str, Any]] = sweep_run,
    cache: DataCache | None = None,
) -> dict[str, Any]:
    """Run every point of a sweep with ``executor`` (default serial, one torch thread
    per run as on a default Ray task) and write ``sweep.json`` and ``sweep.md`` into
    ``out_dir``; each run's folder is ``out_dir/NAME``. ``run_function`` is what each run
    calls (:func:`sweep_run`; a test passes a wrapper that kills its own process)."""
    from pyro_vae.app.executors import SerialExecutor

    executor = executor or SerialExecutor()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [
        {
            "name": run.name,
            "overrides": run.overrides,
            "config": run.config.to_dict(),
            "run_dir": str(out / run.name),
            "progress": progress and executor.name == "serial",
        }
        for run in runs
    ]
    if log is not None:
        log(f"sweep: {len(specs)} runs ({executor.name}) into {out}")
    started = time.perf_counter()
    if run_function is sweep_run:  # (the runs in this process read each data set once)
        run_function = functools.partial(sweep_run, cache=cache or DataCache())
    results = executor.map(run_function, specs, log=log, labels=[r.name for r in runs])
    result = {
        "command": command,
        "grid": grid,
        "executor": executor.name,
        "wall_seconds": time.perf_counter() - started,
        "runs": results,
    }
    atomic_write_json(result, out / "sweep.json")
    atomic_write_text(markdown(result, list(runs[0].overrides) if runs else []), out / "sweep.md")
    return result


def markdown(result: dict[str, Any], keys: Sequence[str]) -> str:
    """The sweep's table: one row per run, its grid values, its numbers."""
    with_log_px = any("test_log_likelihood" in run for run in result["runs"])
    header = ["run", *keys, "epochs", "test ELBO"]
    if with_log_px:
        header.append("test log p(x) (K)")
    header += ["train s", "s / epoch"]
    lines = [
        f"# Sweep: {len(result['runs'])} runs ({result['executor']}, "
        f"{result['wall_seconds']:.1f} s wall time)",
        "",
        "Test ELBO: whole test set, nats per data point (10 samples of z per point), "
        "after the last epoch.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for run in result["runs"]:
        cells = [
            run["name"],
            *(str(run["overrides"][k]) for k in keys),
            str(run["epochs"]),
            f"{run['test_elbo']:.3f}",
        ]
        if with_log_px:
            cells.append(
                f"{run['test_log_likelihood']:.3f} ({run['eval_samples']})"
                if "test_log_likelihood" in run
                else "-"
            )
        cells += [f"{run['train_seconds']:.1f}", f"{run['seconds_per_epoch']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if result["command"]:
        lines += ["", "## Reproduce", "", "```", result["command"], "```"]
    return "\n".join(lines) + "\n"
