"""The flags several commands share, and how flags become a config.

The parser class (usage errors in one line, every default in ``--help``), the flag
groups of estimator options, ``--compile`` and the executors, and :func:`resolve_config`:
the ``train`` flags (:data:`TRAIN_FLAGS`) over ``--config`` over the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from pyro_vae.config import (
    RunConfig,
    legacy_train_section,
    with_protocol,
)
from pyro_vae.errors import UserInputError


def with_default(text: str, default: Any) -> str:
    """``text`` and the flag's default, unless the text states it already or the flag is
    unset or off; a list as the flag takes it (``1,3,10``)."""
    if "default" in text or default is None or default is False or default == argparse.SUPPRESS:
        return text
    if isinstance(default, (tuple, list)):
        default = ",".join(map(str, default))
    return f"{text} (default: {str(default).replace('%', '%%')})".strip()


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's default in ``--help``, once (:func:`with_default`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return with_default(action.help or "", action.default)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2), and every
    flag's default shows in ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.help is None and action.option_strings:  # a flag without help: its default
            action.help = with_default("", action.default) or None
        return action

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def estimator_option_flags(parser: argparse.ArgumentParser) -> None:
    """``--estimator-option NAME=VALUE`` (repeatable) and its shorthand ``--alpha``."""
    parser.add_argument(
        "--estimator-option",
        action="append",
        metavar="NAME=VALUE",
        help="an option of the estimator, e.g. alpha=0.3 for renyi (`pyro-vae estimators` "
        "lists each one's); repeatable",
    )
    parser.add_argument("--alpha", type=float, help="renyi's order: --estimator-option alpha=ALPHA")


def estimator_options(args: argparse.Namespace) -> list[str]:
    """The ``NAME=VALUE`` pairs of ``--estimator-option`` and its shorthands."""
    pairs = list(getattr(args, "estimator_option", None) or [])
    if getattr(args, "alpha", None) is not None:
        pairs.append(f"alpha={args.alpha!r}")
    return pairs


def model_options(pairs: list[str] | None) -> dict[str, Any]:
    """``--model-option NAME=VALUE`` pairs as keywords (VALUE as JSON, else a string)."""

    values: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip().isidentifier():
            raise UserInputError(f"--model-option {pair!r} is not NAME=VALUE: write e.g. width=64")
        try:
            values[name.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[name.strip()] = text
    return values


def int_list(text: str) -> tuple[int, ...]:
    """``"100,50"`` -> ``(100, 50)``; an empty item (``"5,,3"``, ``"5,"``) is an error."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.lstrip("+-").isdigit() for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, with no empty item, got {text!r}"
        )
    return tuple(int(part) for part in parts)


# flag -> (section, field): the flags of `train` that map onto the config
TRAIN_FLAGS = {
    "dataset": ("data", "dataset"),
    "data_dir": ("data", "data_dir"),
    "binarize": ("data", "binarize"),
    "validation_size": ("data", "validation_size"),
    "limit": ("data", "limit"),
    "likelihood": ("model", "likelihood"),
    "latent_dims": ("model", "latent_dims"),
    "hidden": ("model", "hidden"),
    "activation": ("model", "activation"),
    "network": ("model", "network"),
    "guide": ("model", "guide"),
    "free_bits": ("train", "free_bits"),
    "estimator": ("train", "estimator"),
    "particles": ("train", "particles"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "optimizer": ("train", "optimizer"),
    "lr_schedule": ("train", "lr_schedule"),
    "kl_warmup": ("train", "kl_warmup_epochs"),
    "early_stopping": ("train", "early_stopping_patience"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "compile": ("train", "compile"),
    "monitor_images": ("train", "monitor_images"),
    "lr_gamma": ("train", "lr_gamma"),
    "clip_norm": ("train", "clip_norm"),
    "adam_epsilon": ("train", "adam_epsilon"),
    "eval_samples": ("train", "eval_samples"),
    "eval_images": ("train", "eval_images"),
}


def config_default(flag: str) -> Any:
    """The default of a train flag: the config dataclass's, so --help never drifts."""
    section, name = TRAIN_FLAGS[flag]
    value = getattr(getattr(RunConfig(), section), name)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return value


def with_config_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" from the config dataclasses to each train flag's help."""
    for action in parser._actions:
        if action.dest in TRAIN_FLAGS and action.help and "default" not in action.help:
            default = config_default(action.dest)
            shown = default
            if default is None:
                shown = "all" if action.dest in ("limit", "eval_images") else "none"
            action.help += f" (default: {shown})"


def compile_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help=f"replay {what} from a graph captured from the Pyro program and checked against "
        "it; default: when the amount of work repays the capture (about 2 s once per process, "
        "0.2 s per graph); --no-compile runs Pyro eagerly throughout",
    )


def executor_flags(parser: argparse.ArgumentParser, gpus: bool = False) -> None:
    parser.add_argument(
        "--executor",
        choices=("serial", "ray"),
        default="serial",
        help="where the runs train: serial (this process, one after another; default) or ray "
        "(one Ray task per run, in parallel; pip install 'pyro-vae[ray]')",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="with --executor ray: auto or host:port of a running cluster (default: start a "
        "local Ray on this machine's CPUs)",
    )
    parser.add_argument(
        "--cpus-per-run",
        type=int,
        metavar="N",
        help="CPUs each Ray task asks for; on either executor, the torch threads of each "
        "run (default 1), so that serial and Ray runs give the same numbers bit for bit",
    )
    if gpus:
        parser.add_argument(
            "--gpus-per-run",
            type=float,
            metavar="G",
            help="GPUs each Ray task asks for (default 1 for runs on cuda, else 0)",
        )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="Ray: times a run whose worker died is retried, resuming from its checkpoint",
    )


def executor_from_flags(args: argparse.Namespace, gpus_per_run: float = 0.0) -> Any:
    """The executor the flags ask for, checked (Ray installed) before anything is written."""
    from pyro_vae.app.executors import import_ray, make_executor

    if args.ray_address is not None and args.executor != "ray":
        raise UserInputError("--ray-address needs --executor ray")
    if args.cpus_per_run is not None and args.cpus_per_run < 1:
        raise UserInputError(f"--cpus-per-run must be >= 1, got {args.cpus_per_run}")
    if args.max_retries < 0:
        raise UserInputError(f"--max-retries must be >= 0, got {args.max_retries}")
    gpus = getattr(args, "gpus_per_run", None)
    if gpus is None:
        gpus = gpus_per_run
    elif not 0 <= gpus < float("inf"):
        raise UserInputError(f"--gpus-per-run must be >= 0, got {gpus}")
    if args.executor == "ray":
        import_ray()
    return make_executor(args.executor, args.ray_address, args.cpus_per_run, gpus, args.max_retries)


def resolve_config(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """``base`` (the defaults), then ``--config``, then flags; validated as it is built."""
    config = base or RunConfig()
    if getattr(args, "protocol", None):
        config = with_protocol(config, args.protocol)
    if args.config:
        config = overlay(config, args.config)
    values = {flag: getattr(args, flag) for flag in TRAIN_FLAGS}
    sections: dict[str, dict[str, Any]] = {"model": {}, "data": {}}
    if getattr(args, "model", None) is not None:
        sections["model"]["factory"] = args.model
    if getattr(args, "model_option", None):
        sections["model"]["factory_options"] = model_options(args.model_option)
    own = getattr(args, "data", None)
    if own is not None:
        if args.dataset is not None:
            raise UserInputError("--data and --dataset both name the data: pass one of them")
        if not own.exists():
            raise UserInputError(f"--data {own} does not exist: pass a .npy/.npz file or folder")
        sections["data"]["dataset"] = str(own.expanduser().resolve())
    return with_flags(config, values, estimator_options(args), sections)


def with_flags(
    config: RunConfig,
    values: dict[str, Any],
    option_pairs: list[str] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> RunConfig:
    """``config`` with the values of :data:`TRAIN_FLAGS` flags (``None``: not given) and
    the estimator's ``option_pairs`` (``NAME=VALUE`` strings, parsed by its spec), as
    ``train`` applies them: a new estimator drops the replaced one's options; a data
    folder is made absolute. ``extra``: further section settings (model, data)."""
    sections: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}}
    for flag, value in values.items():
        if value is not None:
            section, name = TRAIN_FLAGS[flag]
            sections[section][name] = value
    for section, settings in (extra or {}).items():
        sections[section].update(settings)
    chosen = sections["train"].get("estimator", config.train.estimator)
    if option_pairs:
        from pyro_vae.objectives.registry import estimator_spec

        given = estimator_spec(chosen).parse_options(option_pairs)
        kept = config.train.estimator_options if chosen == config.train.estimator else {}
        sections["train"]["estimator_options"] = {**kept, **given}
    elif chosen != config.train.estimator:
        sections["train"]["estimator_options"] = {}  # (the options of the one replaced)
    # run folders hold absolute paths: they are read from any directory
    if sections["data"].get("data_dir") is not None:
        sections["data"]["data_dir"] = str(
            Path(sections["data"]["data_dir"]).expanduser().resolve()
        )
    return RunConfig(
        model=dataclasses.replace(config.model, **sections["model"]),
        data=dataclasses.replace(config.data, **sections["data"]),
        train=dataclasses.replace(config.train, **sections["train"]),
    )


def overlay(config: RunConfig, path: Path) -> RunConfig:
    """The settings of config file ``path`` over ``config`` (validated as a whole first,
    so that its errors name the file)."""
    from pyro_vae.io import read_json

    RunConfig.load(path)  # unknown sections or keys, bad values: one line naming the file
    values = read_json(path, "config file")
    return RunConfig(
        model=dataclasses.replace(config.model, **values.get("model", {})),
        data=dataclasses.replace(config.data, **values.get("data", {})),
        train=dataclasses.replace(config.train, **legacy_train_section(values.get("train", {}))),
    )
