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
