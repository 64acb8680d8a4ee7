"""Griffe extension: the package's Sphinx (reST) docstring markup, read as Markdown.

The docstrings of ``pyro_vae`` are written for Sphinx: cross-reference roles
(``:func:`make_elbo```, ``:class:`~pyro_vae.models.vae.VAE```), literal blocks introduced
by ``::`` (``Example::``) and ``.. math::`` directives. mkdocstrings renders docstrings as
Markdown, where all three would print as raw text. Once the package is loaded (so every
name can be resolved), this extension rewrites each docstring's text:

- a role whose target resolves, in the scope of the documented object, to a public
  object of the package becomes an autorefs link, ``[`make_elbo`][pyro_vae.objectives.
  registry.make_elbo]`` (``~`` keeps only the last component as the text, as in Sphinx);
  a role naming something outside the package (``torch``, ``pyro``, ...) or a private
  object that the API pages do not show becomes inline code;
- ``text::`` + an indented block becomes ``text:`` + a fenced code block (Python when the
  block parses as Python, plain text otherwise);
- ``.. math::`` + an indented block becomes a ``$$ ... $$`` block (rendered at build time
  by ``docs/hooks.py``).

A role naming an object of the package that does not exist is logged as a warning (so
``mkdocs build --strict`` fails on it) unless ``CORRECTIONS`` says what it meant. The
docstrings themselves are not changed (``docs/hooks.py`` loads the package through this
extension too, for the class docstrings it copies into the configuration reference).
"""

from __future__ import annotations

import ast
import logging
import re
import textwrap
from typing import Any

import griffe

logger = logging.getLogger("mkdocs.plugins.pyro_vae.sphinx_markup")

PACKAGE = "pyro_vae"
ROLE = re.compile(r":(?:py:)?(mod|class|func|meth|attr|data|exc|obj|const):`([^`]+)`")
LITERAL_INTRO = re.compile(r"^(?P<indent>\s*)(?P<text>.*?)(?P<space>\s?)::\s*$")
DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\.\s+(?P<name>[\w-]+)::\s*(?P<arg>.*)$")

# roles of pyro_vae's docstrings that name no object -> the object they meant (any other
# such role fails the build); written in pyro_vae.app.compare, pyro_vae.app.sweep and
# pyro_vae.objectives.capture
CORRECTIONS = {
    "pyro_vae.executors": "pyro_vae.app.executors",
    "pyro_vae.evaluation.log_likelihood": "pyro_vae.analysis.evaluation.log_likelihood",
}


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The indented block after line ``start - 1``: its lines (blank lines inside kept,
    trailing ones dropped) and the index of the first line after it."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent_of(lines[end]) > base):
        end += 1
    body = lines[start:end]
    while body and not body[-1].strip():
        body.pop()
        end -= 1
    while body and not body[0].strip():
        body.pop(0)
    return body, end


def _is_python(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        return False
    return True


def convert_blocks(text: str, stats: dict[str, int] | None = None) -> str:
    """``::`` literal blocks to fenced code, ``.. math::`` to ``$$`` blocks."""
    stats = {} if stats is None else stats
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if in_fence:
            out.append(line)
            i += 1
            continue
        directive = DIRECTIVE.match(line)
        if directive and directive["name"] == "math":
            base = _indent_of(line)
            body, i = _block(lines, i + 1, base)
            pad = " " * base
            tex = textwrap.dedent("\n".join(body))
            if directive["arg"].strip():
                tex = directive["arg"].strip() + ("\n" + tex if tex else "")
            out += [pad + "$$", *(pad + row for row in tex.split("\n")), pad + "$$"]
            stats["math"] = stats.get("math", 0) + 1
            continue
        intro = LITERAL_INTRO.match(line)
        if intro and not directive and not line.strip().startswith(".."):
            base = _indent_of(line)
            body, end = _block(lines, i + 1, base)
            if body and all(not row.strip() or _indent_of(row) > base for row in body):
                code = textwrap.dedent("\n".join(body))
                text_before = intro["text"]
                if text_before:
                    # "Example::" reads "Example:"; "text ::" drops the colons
                    out.append(intro["indent"] + text_before + ("" if intro["space"] else ":"))
                    out.append("")
                pad = " " * base
                language = "python" if _is_python(code) else "text"
                out += [pad + "```" + language, *(pad + row for row in code.split("\n"))]
                out.append(pad + "```")
                stats["literal_blocks"] = stats.get("literal_blocks", 0) + 1
                i = end
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class SphinxMarkup(griffe.Extension):
    """Rewrites the Sphinx markup of the package's docstrings as Markdown (see module)."""

    def __init__(self, corrections: dict[str, str] | None = None) -> None:
        super().__init__()
        self.corrections = dict(CORRECTIONS if corrections is None else corrections)
        self.package: griffe.Module | None = None
        # last name component -> the paths of the shown objects of that name
        self.by_name: dict[str, list[str]] = {}
        # what was rewritten, for the build log
        self.stats = {"roles": 0, "linked": 0, "code": 0, "literal_blocks": 0, "math": 0}
        # (documented object, target) of each role made a link, and (object, role) of
        # each printed as code: the docs tests check the rendered pages against them
        self.links: list[tuple[str, str]] = []
        self.as_code: list[tuple[str, str]] = []

    # -- name resolution ------------------------------------------------------------------

    def _lookup(self, path: str) -> griffe.Object | griffe.Alias | None:
        assert self.package is not None
        if path == PACKAGE:
            return self.package
        if not path.startswith(PACKAGE + "."):
            return None
        try:
            return self.package[path[len(PACKAGE) + 1 :]]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None

    def _resolve(self, name: str, scope: griffe.Object) -> str:
        """The full dotted path ``name`` means in ``scope`` (may be outside the package).

        An absolute name is taken as written; a relative one is looked up in the scope
        of the documented object (its members, its module's names and imports), and
        failing that, as Sphinx's ``.name`` does, among the objects the API pages show:
        the one whose path ends with it, in the scope's subpackage first."""
        if name.startswith(PACKAGE + ".") or name == PACKAGE:
            return name
        head, _, rest = name.partition(".")
        try:
            full = scope.resolve(head)
        except griffe.NameResolutionError:
            return self._by_suffix(name, scope) or name
        return f"{full}.{rest}" if rest else full

    def _by_suffix(self, name: str, scope: griffe.Object) -> str | None:
        candidates = [
            path
            for path in self.by_name.get(name.rsplit(".", 1)[-1], [])
            if path.endswith("." + name)
        ]
        subpackage = ".".join(scope.path.split(".")[:2]) + "."
        for pool in ([p for p in candidates if p.startswith(subpackage)], candidates):
            if len(pool) == 1:
                return pool[0]
        return None

    def _index(self, obj: griffe.Object) -> None:
        for member in obj.members.values():
            if not member.is_alias and self._shown(member):
                self.by_name.setdefault(member.name, []).append(member.path)
                self._index(member)  # type: ignore[arg-type]

    @staticmethod
    def _shown(obj: griffe.Object | griffe.Alias) -> bool:
        """Whether the API pages show ``obj``: it and each of its parents are public."""
        node: Any = obj
        while node is not None and node.path != PACKAGE:
            if node.name.startswith("_") or not node.is_public:
                return False
            node = node.parent
        return True

    def _role(self, match: re.Match[str], scope: griffe.Object) -> str:
        self.stats["roles"] += 1
        target = match[2].strip()
        short = target.startswith("~")
        name = target.lstrip("~").lstrip(".").removesuffix("()")
        name = self.corrections.get(name, name)
        text = name.rsplit(".", 1)[-1] if short else name
        path = self._resolve(name, scope)
        obj = self._lookup(path)
        if obj is not None and obj.is_alias:
            try:
                obj = obj.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                obj = None
        if obj is not None and self._shown(obj):
            self.stats["linked"] += 1
            self.links.append((scope.path, obj.path))
            return f"[`{text}`][{obj.path}]"
        in_package = path == PACKAGE or path.startswith(PACKAGE + ".")
        if in_package and obj is None:
            logger.warning(
                "%s: the role %s names %s, which does not exist",
                scope.path,
                match[0],
                path,
            )
        self.stats["code"] += 1
        self.as_code.append((scope.path, match[0]))
        return f"`{text}`"

    # -- the rewrite ----------------------------------------------------------------------

    def _convert(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            value = convert_blocks(obj.docstring.value, self.stats)
            obj.docstring.value = ROLE.sub(lambda m: self._role(m, obj), value)
        for member in obj.members.values():
            if not member.is_alias:
                self._convert(member)  # type: ignore[arg-type]

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        self.package = pkg
        self._index(pkg)
        self._convert(pkg)
        logger.info(
            "sphinx markup: %(roles)d roles (%(linked)d linked, %(code)d as code), "
            "%(literal_blocks)d literal blocks, %(math)d math blocks",
            self.stats,
        )


def load_package(search_path: str, markup: SphinxMarkup | None = None) -> griffe.Module:
    """``pyro_vae`` loaded statically with its docstrings rewritten as the API pages show
    them (``#:`` comments included, through griffe-sphinx), by ``markup`` if given."""
    extensions = griffe.load_extensions("griffe_sphinx", markup or SphinxMarkup)
    package = griffe.load(PACKAGE, search_paths=[search_path], extensions=extensions)
    assert isinstance(package, griffe.Module)
    return package
