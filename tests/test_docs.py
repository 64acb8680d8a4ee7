"""The docs stay true to the code: every ``pyro_vae.X`` they name exists, every relative
link of the README and the docs points at a file of the repository, and the Python
examples of the getting-started and own-model pages run as printed. (``mkdocs build
--strict`` in CI checks the links between pages and the API reference.)"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import pyro_vae

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def _resolves(dotted: str) -> bool:
    obj = pyro_vae
    for part in dotted.strip(".").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            try:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
            except (ImportError, AttributeError):
                return False
    return True


def test_every_pyro_vae_name_in_the_readme_and_the_docs_exists():
    missing = []
    for page in [REPO / "README.md", *PAGES]:
        for dotted in set(
            re.findall(r"\bpyro_vae((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", page.read_text())
        ):
            if not _resolves(dotted):
                missing.append(f"{page.relative_to(REPO)}: pyro_vae{dotted}")
    assert not missing, missing


@pytest.mark.parametrize("page", [REPO / "README.md", *PAGES], ids=lambda p: p.name)
def test_relative_links_point_at_files_of_the_repository(page):
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = (page.parent / target).resolve()
        if not path.exists() or REPO not in path.parents:
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: {broken}"
    assert "../shared" not in text, "user-facing text points outside the repository"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


@pytest.mark.parametrize(
    "name",
    [
        "getting-started.md",
        "guide/own-model.md",
        "guide/own-estimator.md",
        "guide/configuration.md",
    ],
)
def test_the_python_examples_of_the_docs_run(name, capsys):
    for block in _python_blocks(DOCS / name):
        exec(compile(block, name, "exec"), {"__name__": "docs_example"})
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower()
