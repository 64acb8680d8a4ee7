"""MkDocs hook: the reference tables, generated at build time.

``docs/guide/configuration.md`` holds two markers. ``<!-- config-reference -->`` becomes
one table per config dataclass of ``pyro_vae.config`` (field, type, default, and the
comment written beside the field in the source); ``<!-- cli-reference -->`` becomes the
``--help`` of ``pyro-vae`` and of each of its commands, from
``pyro_vae.app.cli.build_parser``. Nothing is copied by hand, so the page cannot drift
from the code. ``<!-- public-names -->`` becomes the table of ``pyro_vae``'s public
names (``pyro_vae._EXPORTS``), each linked to its API page. In
``docs/guide/own-estimator.md``, ``<!-- estimator-reference -->`` becomes the table of
the registry's estimators, from their specs. In ``docs/performance.md``,
``<!-- benchmark-tables -->`` becomes the tables of the committed
``benchmarks/results.json`` (``benchmarks/tables.py``, as ``benchmarks/run.py`` prints
them) and ``<!-- benchmark-runs -->`` the same cells in every committed run side by side
(``results.json`` and ``benchmarks/repeats/``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import re
import sys
import tokenize
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "docs"):  # the package, and the modules beside this hook
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import tex_mathml  # noqa: E402 (needs the path above)

CONFIG_CLASSES = ("ModelConfig", "DataConfig", "TrainConfig", "RunConfig")


def _field_comments(source: str, class_name: str) -> dict[str, str]:
    """field name -> its comment: the one on the field's line, else the comment lines
    right above it."""
    comments: dict[int, str] = {}  # line -> its comment
    alone: set[int] = set()  # the lines that hold a comment and nothing else
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
            if not token.line[: token.start[1]].strip():
                alone.add(token.start[0])
    tree = ast.parse(source)
    result: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    line = stmt.lineno
                    text = comments.get(line)
                    if text is None:
                        above, row = [], line - 1
                        while row in alone:  # not the comment beside the field above
                            above.insert(0, comments[row])
                            row -= 1
                        text = " ".join(above)
                    result[stmt.target.id] = text
    return result


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code_cell(text: str) -> str:
    """Inline code in a table cell. Python-Markdown's tables split no cell at a ``|``
    inside backticks, and would print an escaping backslash there as it is."""
    return f"`{text}`".replace("\n", " ")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return _code_cell(repr(field.default))
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return _code_cell(f"{field.default_factory.__name__}()")  # type: ignore[misc]
    return "(required)"


def config_reference() -> str:
    from sphinx_markup import load_package

    import pyro_vae.config as config

    source = inspect.getsource(config)
    # the class docstrings as the API pages show them (roles as links, literal blocks as code)
    documented = load_package(str(ROOT))["config"]
    sections = {"ModelConfig": "model", "DataConfig": "data", "TrainConfig": "train"}
    parts = []
    for name in CONFIG_CLASSES:
        cls = getattr(config, name)
        comments = _field_comments(source, name)
        section = sections.get(name)
        title = f"### `{name}`" + (f" (config file section `{section}`)" if section else "")
        parts.append(title)
        docstring = documented[name].docstring
        if docstring is not None:
            parts.append(docstring.value)
        parts.append("| field | type | default | meaning |\n| --- | --- | --- | --- |")
        rows = [
            f"| {_code_cell(f.name)} | {_code_cell(str(f.type))} | {_default(f)} | "
            f"{_cell(comments.get(f.name, ''))} |"
            for f in dataclasses.fields(cls)
        ]
        parts[-1] += "\n" + "\n".join(rows)
    return "\n\n".join(parts)


def cli_reference() -> str:
    import argparse

    from pyro_vae.app.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix the width
    parser = build_parser()
    parts = ["### `pyro-vae`", "```text\n" + parser.format_help().rstrip() + "\n```"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts.append(f"### `pyro-vae {name}`")
                parts.append("```text\n" + sub.format_help().rstrip() + "\n```")
    return "\n\n".join(parts)


def public_names() -> str:
    """The table of ``pyro_vae``'s public names, each linked to its API page."""
    import pyro_vae

    pages = {"models", "objectives", "analysis", "training", "app"}
    rows = ["| name | defined in |", "| --- | --- |"]
    for name in sorted(pyro_vae._EXPORTS):
        module = pyro_vae._EXPORTS[name]
        page = module.split(".")[1] if module.split(".")[1] in pages else "data-config"
        rows.append(f"| [`{name}`]({page}.md#{module}.{name}) | `{module}` |")
    return "\n".join(rows)


def estimator_reference() -> str:
    """The table of the registry's estimators: what each is, its options, its claims."""
    from pyro_vae.objectives.registry import ESTIMATORS

    rows = [
        "| name | what it is | options | a bound | a value | captured | paper |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec in ESTIMATORS.values():
        options = "; ".join(
            f"`{o.name}` ({o.type.__name__}, default `{o.default!r}`): {o.help}"
            for o in spec.options
        )
        rows.append(
            f"| `{spec.name}` | {_cell(spec.summary)} | {_cell(options) or '-'} | "
            f"{'yes' if spec.is_bound else 'no'} | {'yes' if spec.has_value else 'no'} | "
            f"`{spec.capture}` | {_cell(spec.reference) or '-'} |"
        )
    return "\n".join(rows)


def _benchmark_tables() -> ModuleType:
    """``benchmarks/tables.py`` (plain Python: it reads the committed results), loaded
    from its path: MkDocs does not keep this hook's additions to ``sys.path``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
    assert spec is not None and spec.loader is not None
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    return tables


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 (MkDocs hook signature)
    if "<!-- estimator-reference -->" in markdown:
        markdown = markdown.replace("<!-- estimator-reference -->", estimator_reference())
    if "<!-- config-reference -->" in markdown:
        markdown = markdown.replace("<!-- config-reference -->", config_reference())
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", cli_reference())
    if "<!-- benchmark-" in markdown:  # (tables.py loaded once for the page's markers)
        tables = _benchmark_tables()
        for marker, render in (("tables", tables.page), ("runs", tables.runs_page)):
            if f"<!-- benchmark-{marker} -->" in markdown:
                markdown = markdown.replace(f"<!-- benchmark-{marker} -->", render())
    if "<!-- public-names -->" in markdown:
        markdown = markdown.replace("<!-- public-names -->", public_names())
    return markdown


def on_page_content(html, page, config, files):  # noqa: ARG001 (MkDocs hook signature)
    """The page's equations as MathML (``docs/tex_mathml.py``), rendered here, not by a
    script loaded when the page is read."""
    html, _ = tex_mathml.render(html)
    if page.file.src_uri.endswith(".ipynb"):
        _notebook_toc(html, page)
    return html


HEADING_ID = re.compile(r'<h[1-6][^>]*\bid="([^"]+)"')


def _toc_items(items):
    for item in items:
        yield item
        yield from _toc_items(item.children)


def _notebook_toc(html, page):
    """mkdocs-jupyter slugs a notebook's table of contents from the Markdown (where
    "SVI with `Trace_ELBO`" gives ``svi-with``) but nbconvert gives the headings their own
    ids (``svi-with-trace_elbo``): point each entry at its heading's id, in order."""
    ids = HEADING_ID.findall(html)
    items = list(_toc_items(page.toc.items))
    if len(ids) == len(items):
        for item, heading_id in zip(items, ids):
            item.id = heading_id
