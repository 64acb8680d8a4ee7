"""One run trained into its folder: the checks before a run, written once, and the
training of a run into its folder that ``train``, ``compare``, ``sweep`` and
``reproduce`` share.

:func:`checked_model` is what every command checks before anything is written: the data
fits the model and memory, the estimator fits the model and can be built;
:func:`prepare_run` adds the device, the data and the time of the final evaluation.
:func:`train_in_folder` trains (or resumes) one run in its folder and times it: every
command's runs train through it. :func:`run_training` trains a prepared run that way
under ``train``'s policy (:mod:`pyro_vae.app.run_folder`; a :class:`Transaction` takes
back what a failed first epoch wrote), evaluates it and writes its report.
Heavy modules (torch) are imported inside the functions, so that ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pyro_vae.app.flags import TRAIN_FLAGS
from pyro_vae.config import DataConfig, RunConfig
from pyro_vae.errors import UserInputError
from pyro_vae.resources import check_device

if TYPE_CHECKING:
    import torch

__all__ = [
    "PreparedRun",
    "Transaction",
    "checked_model",
    "checkpoint_epoch",
    "final_evaluation_images",
    "DataCache",
    "prepare_run",
    "reproduce_command",
    "run_flags",
    "run_training",
    "train_in_folder",
]


def checked_model(config: RunConfig, data: Any, *, on_device: bool = True) -> Any:
    """The run's model, built from its seed, after every check a run makes before it
    writes: the step fits in memory, the data fits the model, the estimator fits the
    model and is built once (a bad combination fails now, not after any file is written).
    ``on_device``: the model is moved to the run's device before the checks (the checks
    run where it trains); a device this machine lacks is refused by
    :func:`~pyro_vae.resources.check_device`, called before the data is read."""
    import torch

    from pyro_vae.models.build import build_vae
    from pyro_vae.objectives.registry import check_estimator_fits, make_elbo
    from pyro_vae.resources import check_training_fits
    from pyro_vae.training.fit import check_data_once

    check_training_fits(config, data.data_shape, len(data.train))
    torch.manual_seed(config.train.seed)
    vae = build_vae(config.model, data.data_shape)
    if on_device:
        vae = vae.to(config.train.device)
    check_data_once(vae, data)
    check_estimator_fits(config.train.estimator, vae)
    make_elbo(
        config.train.estimator, config.train.particles, options=config.train.estimator_options
    )
    return vae


class DataCache:
    """The data sets a command's runs read, each read once: the runs of one comparison or
    sweep in this process share them (none of them changes one). The cache belongs to the
    command that made it, and ends with it: a later command reads the files afresh (a
    data file changed in between is seen). Pickled for a task in another process (a Ray
    task), it travels empty: that process reads the data itself, once per task."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._sets: dict[tuple[Any, ...], Any] = {}

    def get(self, data_config: DataConfig, seed: int) -> Any:
        """The :class:`~pyro_vae.data.VAEData` of ``data_config`` split with ``seed``."""
        key = (dataclasses.astuple(data_config), seed)
        if key not in self._sets:
            while len(self._sets) >= self.size:  # the oldest goes
                self._sets.pop(next(iter(self._sets)))
            self._sets[key] = data_config.load(seed)
        return self._sets[key]

    def __reduce__(self) -> tuple[Any, ...]:
        return (DataCache, (self.size,))


def train_in_folder(
    config: RunConfig,
    data: Any,
    run_dir: Path,
    progress: bool,
    callbacks: Sequence[Callable[..., Any]] = (),
    initial_state: dict[str, torch.Tensor] | None = None,
    *,
    vae: Any = None,
    resumed_at: int | None | Literal["folder"] = "folder",
    log: Callable[[str], Any] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Train (or resume) one run in ``run_dir``: the model, its history, and the timing
    fields of its record (wall and CPU time; CPU time beside wall time, since wall time
    swings with the load of other processes). Every command trains its runs through this
    (``train`` and ``reproduce`` by :func:`run_training`, ``compare`` and ``sweep`` per
    run).

    ``vae``: the model to train (checked: :func:`checked_model`); by default built from
    the run's seed. ``resumed_at``: the epoch of the folder's checkpoint to continue (its
    config verified by the caller), ``None`` to start afresh; by default the folder's
    checkpoint is continued when it holds one of the same config (:func:`checkpoint_epoch`).
    ``initial_state``: the parameters to start from (a comparison's, shared by its
    estimators) instead of the fresh model's. ``log``: each epoch's line."""
    import torch

    from pyro_vae.models.build import build_vae
    from pyro_vae.training.fit import fit
    from pyro_vae.training.trainer import CHECKPOINT

    if resumed_at == "folder":
        resumed_at = checkpoint_epoch(run_dir / CHECKPOINT, config)
    # a run folder like any other: evaluate, sample and diagnose read its config.json
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    if vae is None:
        torch.manual_seed(config.train.seed)
        vae = build_vae(config.model, data.data_shape)
    if initial_state is not None:
        vae.load_state_dict(initial_state)
    started, cpu_started = time.perf_counter(), time.process_time()
    history = fit(
        vae,
        data,
        config.train,
        run_dir=run_dir,
        resume=resumed_at is not None,
        saved_config=config.to_dict(),
        callbacks=callbacks,
        progress=progress,
        log=log,
    )
    train_seconds = time.perf_counter() - started
    train_cpu_seconds = time.process_time() - cpu_started
    trained_epochs = max(1, len(history) - (resumed_at or 0))
    timing = {
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "cpu_seconds_per_epoch": train_cpu_seconds / trained_epochs,
        "resumed_at_epoch": resumed_at,
    }
    return vae, history, timing


def checkpoint_epoch(path: Path, config: RunConfig) -> int | None:
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


class Transaction:
    """What ``train`` wrote, taken back if it fails before its first epoch is saved."""

    def __init__(self, out: Path, replacing: bool) -> None:
        self.out = out
        self.replacing = replacing
        config = out / "config.json"
        self.config_before = config.read_bytes() if config.exists() else None
        self.existing = {p.name for p in out.iterdir()} if out.exists() else set()
        self.committed = False

    def commit(self, *_: Any) -> None:
        """The first epoch of this command is checkpointed: the run stands."""
        if not self.committed:
            from pyro_vae.app.runs import drop_replaced

            self.committed = True
            drop_replaced(self.out)

    def rollback(self) -> None:
        from pyro_vae.app.runs import RUN_FILES, restore_replaced

        if self.committed:
            return
        if self.replacing:
            restore_replaced(self.out)
            return
        for name in RUN_FILES:
            path = self.out / name
            if name not in self.existing and path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if self.config_before is not None:
            from pyro_vae.io import atomic_write_bytes

            atomic_write_bytes(self.config_before, self.out / "config.json")


@dataclasses.dataclass
class PreparedRun:
    """A run checked and ready before its folder is touched: config, data, model, the
    estimated seconds of the final evaluation, and the epochs already trained."""

    config: RunConfig
    data: Any
    vae: Any
    evaluation_seconds: float = 0.0  # estimated, for the final log p(x)
    start_epoch: int = 0  # epochs already trained (a resumed run)


def prepare_run(config: RunConfig, quiet: bool = False) -> PreparedRun:
    """Everything a run needs, checked, before its folder is touched: the device, the
    data (read and checked against the model), the model, the estimator, the memory,
    and the time the final log p(x) will take (an absurd K is refused now, not after
    training)."""
    from pyro_vae.app.training_run import checked_model

    check_device(config.train.device)
    data = config.data.load(config.train.seed)
    # on its device from the start: the checks and the time estimate run where it trains
    vae = checked_model(config, data)
    seconds = 0.0
    if config.train.eval_samples and not quiet:  # (the other torchrun processes: no estimate)
        from pyro_vae.analysis.evaluation import announce_evaluation

        images = final_evaluation_images(config, data)
        seconds = announce_evaluation(vae, images, config.train.eval_samples, log=None)
    if config.model.likelihood == "bernoulli" and config.data.binarize == "none" and not quiet:
        print(
            "note: grey levels under a Bernoulli likelihood are scored by cross-entropy, not "
            "a normalized density: log p(x) is not comparable to published numbers (use "
            "--binarize dynamic, or --likelihood continuous_bernoulli)",
            file=sys.stderr,
        )
    return PreparedRun(config, data, vae, seconds)


def run_training(
    prepared: PreparedRun,
    out: Path,
    transaction: Transaction,
    *,
    resume: bool,
    quiet: bool = False,
    tensorboard: bool = False,
    announce: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Train a prepared run into ``out`` (under its lock), evaluate it, write plots and the
    report; ``transaction`` takes back what was written if the first epoch fails;
    ``announce`` is given the run to train (its config, ``resume`` and ``out``) before
    training starts: under torchrun, the other processes train it with this one."""
    from pyro_vae.analysis.evaluation import evaluate
    from pyro_vae.app.run_report import write_plots, write_report
    from pyro_vae.io import atomic_write_json
    from pyro_vae.resources import human_seconds

    config, data, vae = prepared.config, prepared.data, prepared.vae
    callbacks: list[Any] = [transaction.commit]
    tracker = None
    if tensorboard:
        from pyro_vae.app.tracking import TensorBoardLogger

        start = prepared.start_epoch
        tracker = TensorBoardLogger(out / "tensorboard", start_epoch=start)
        callbacks.append(tracker)
    config.save(out / "config.json")
    progress = not quiet
    if announce is not None:
        announce({"config": config.to_dict(), "resume": resume, "out": str(out)})
    resumed_at = prepared.start_epoch if resume else None
    vae, history, _ = train_in_folder(
        config, data, out, progress, callbacks, vae=vae, resumed_at=resumed_at, log=print
    )
    transaction.commit()  # (a resumed run with no epoch left to train)
    if tracker is not None:
        tracker.log_images(vae, data.evaluation_images("test"), len(history.epochs))
        tracker.close()
    evaluation = None
    samples = config.train.eval_samples
    if samples:
        images = final_evaluation_images(config, data).to(config.train.device)
        print(
            f"evaluating: importance-sampled log p(x) with K={samples} on {len(images):,} "
            f"test images, about {human_seconds(prepared.evaluation_seconds)} ..."
        )
        evaluation = evaluate(vae, images, samples, progress=progress).to_dict()
    flags = run_flags(config, history.epochs, evaluation)
    if evaluation is not None:
        evaluation["flags"] = [flag.to_dict() for flag in flags]
        atomic_write_json(evaluation, out / "evaluation.json")
        from pyro_vae.app.commands.evaluate import format_evaluation

        print(format_evaluation(evaluation))
    for flag in flags:
        print(f"warning: {flag.message()}", file=sys.stderr)
    plot_paths = write_plots(out, vae, data, history.epochs)
    report = write_report(
        out,
        config,
        history.epochs,
        evaluation,
        reproduce_command(config, out),
        plot_paths,
        history.stopped_early,
        history.best_epoch,
        flags=flags,
    )
    print(f"run folder: {out}  (report: {report})")
    return 0


def run_flags(
    config: RunConfig, epochs: list[dict[str, Any]], evaluation: dict[str, Any] | None
) -> list[Any]:
    """The numbers of a run that cannot be right (:mod:`pyro_vae.analysis.sanity`):
    bounds above 0 under a Bernoulli likelihood, jumps between epochs, an ELBO above
    log p(x)."""
    from pyro_vae.analysis.sanity import evaluation_flags, history_flags
    from pyro_vae.objectives.registry import ESTIMATORS

    binary = config.model.likelihood == "bernoulli"
    spec = ESTIMATORS.get(config.train.estimator)
    flags = history_flags(epochs, binary=binary, is_bound=spec is None or spec.is_bound)
    if evaluation is not None:
        flags += evaluation_flags(evaluation, binary=binary)
    return flags


def final_evaluation_images(config: RunConfig, data: Any) -> Any:
    """The test images of the final evaluation: all, or ``config.train.eval_images`` of
    them, a fixed random subset (seeded by the run's seed, the same on every resume)."""
    from pyro_vae.analysis.evaluation import fixed_subset

    return fixed_subset(data.evaluation_images("test"), config.train.eval_images)


def reproduce_command(config: RunConfig, out: Path) -> str:
    """The command that recreates the run from scratch in a fresh folder: every setting
    that differs from the defaults, as its flag (settings without a flag: as a config)."""
    import shlex

    defaults = RunConfig()
    flags = {value: flag for flag, value in TRAIN_FLAGS.items()}
    argv = ["train", "--dataset", config.data.dataset]  # (named even when the default)
    for section in ("data", "model", "train"):
        for name, value in config.section(section).items():
            if value == defaults.section(section)[name] or name == "dataset":
                continue
            flag = flags.get((section, name))
            if flag is None or value is None:
                # a setting no flag can express (a learned Gaussian scale, all monitor
                # images): the run's own config.json recreates it
                return "pyro-vae " + shlex.join(
                    ["train", "--config", str(out / "config.json"), "--out", "NEW_FOLDER"]
                )
            option = f"--{flag.replace('_', '-')}"
            if isinstance(value, bool):
                argv.append(option if value else f"--no-{flag.replace('_', '-')}")
            elif isinstance(value, (tuple, list)):
                argv += [option, ",".join(map(str, value))]
            else:
                argv += [option, str(value)]
    argv += ["--out", str(out)]
    return "pyro-vae " + shlex.join(argv)
