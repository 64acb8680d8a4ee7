"""The command table: one module per command, and the docs' CLI reference in step."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from pyro_vae.app.cli import build_parser
from pyro_vae.app.commands import COMMANDS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_command_of_the_table_has_its_section_in_the_cli_reference_and_no_other():
    reference = _hooks().cli_reference()
    sections = re.findall(r"^### `pyro-vae ([\w-]+)`$", reference, re.M)
    assert sections == list(COMMANDS)
    assert "<!-- cli-reference -->" in (DOCS / "guide" / "configuration.md").read_text()


def test_each_command_module_adds_its_parser_and_runs():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert list(subparsers.choices) == list(COMMANDS)
    for name, module in COMMANDS.items():
        assert module.__name__ == f"pyro_vae.app.commands.{name}"
        assert callable(module.add_parser) and callable(module.run)


def test_a_reproduce_cells_config_is_the_train_command_it_stands_for(tmp_path):
    """reproduce builds each cell's config, not a train command line: it must equal the
    config of `train --protocol iwae` with the cell's and reproduce's flags, starting
    and over a saved run's own settings (a resume), for every cell."""
    import dataclasses

    from pyro_vae.app.commands.reproduce import CellSettings
    from pyro_vae.app.flags import resolve_config
    from pyro_vae.app.reproduce import TABLES
    from pyro_vae.config import RunConfig

    saved = RunConfig()
    saved = dataclasses.replace(
        saved,
        data=dataclasses.replace(saved.data, limit=300),
        train=dataclasses.replace(saved.train, estimator="renyi", estimator_options={"alpha": 0.3}),
    )
    option_sets = [
        (),
        (("epochs", 3), ("eval_samples", 50), ("dataset", "digits"), ("limit", 200)),
        (("data_dir", str(tmp_path / ".." / "mnist")), ("eval_images", 10), ("device", "cpu")),
    ]
    for cell in TABLES["iwae-table1"]:
        for options in option_sets:
            argv = ["train", "--protocol", "iwae", "--estimator", cell.estimator]
            argv += ["--latent-dims", ",".join(map(str, cell.latent_dims))]
            argv += ["--particles", str(cell.k), "--out", str(tmp_path / cell.name)]
            for flag, value in options:
                argv += [f"--{flag.replace('_', '-')}", str(value)]
            args = build_parser().parse_args(argv)
            for base in (None, saved):
                assert CellSettings(cell, options)(base) == resolve_config(args, base=base)
