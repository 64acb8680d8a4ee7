"""The package's shape: no import cycles (imports inside functions included), one public
API that type checkers, the README and the code agree on, and a layout section in the
README that matches the tree."""

from __future__ import annotations

import ast
import re

import pytest

import pyro_vae

from .conftest import REPO

PACKAGE = REPO / "pyro_vae"


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports, at any depth of the file (functions too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                if candidate in modules:
                    targets.add(candidate)
        graph[name] = targets - {name}
    return graph


def test_no_module_imports_itself_back_through_others():
    graph = import_graph()
    # the root package re-exports names lazily and is imported by nobody inside
    graph = {m: {t for t in ts if t != "pyro_vae"} for m, ts in graph.items()}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_public_api_table_equals_the_type_checking_imports_and_resolves():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    guarded = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for stmt in node.body:
                for alias in stmt.names:
                    guarded[alias.name] = stmt.module
    assert guarded == pyro_vae._EXPORTS
    for name in pyro_vae.__all__:
        assert getattr(pyro_vae, name) is not None
    for name in pyro_vae._MODULES:
        assert getattr(pyro_vae, name).__name__ == f"pyro_vae.{name}"
    with pytest.raises(AttributeError):
        pyro_vae.no_such_name  # noqa: B018


def test_the_readme_layout_lists_every_module_of_the_tree():
    """The tree drawn in the README's Layout section (two spaces per level) is the
    package's tree, module for module."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    listed, folders = set(), []
    for line in block.splitlines()[1:]:
        if not line.strip() or line.strip() == "pyro_vae/":
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        folders = folders[: depth - 1]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            listed.add("/".join([*folders, name]))
    actual = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    actual = {a for a in actual if not a.endswith("/__init__.py")}
    assert listed == actual, (
        f"in the tree, not the README: {sorted(actual - listed)}; "
        f"in the README, not the tree: {sorted(listed - actual)}"
    )


def test_each_choice_is_declared_once_and_implemented_for_exactly_its_names():
    """The names live in pyro_vae.choices (and the estimator registry); the tables that
    implement them, the config's checks and the CLI's choices cover exactly those."""
    from pyro_vae import choices
    from pyro_vae.app.cli import build_parser
    from pyro_vae.config import DataConfig, ModelConfig, TrainConfig
    from pyro_vae.errors import UserInputError
    from pyro_vae.models.likelihoods import make_likelihood
    from pyro_vae.models.networks import ACTIVATIONS
    from pyro_vae.objectives.registry import ESTIMATORS, make_elbo

    assert set(ACTIVATIONS) == set(choices.ACTIVATIONS)
    for name in choices.LIKELIHOODS:
        make_likelihood(name, 4)
    for name in ESTIMATORS:
        make_elbo(name, 2)
    for field, names, config in (
        ("estimator", ESTIMATORS, TrainConfig),
        ("lr_schedule", choices.LR_SCHEDULES, TrainConfig),
        ("optimizer", choices.OPTIMIZERS, TrainConfig),
        ("likelihood", choices.LIKELIHOODS, ModelConfig),
        ("activation", choices.ACTIVATIONS, ModelConfig),
        ("network", choices.NETWORKS, ModelConfig),
        ("dataset", choices.DATASETS, DataConfig),
        ("binarize", choices.BINARIZATIONS, DataConfig),
    ):
        with pytest.raises(UserInputError, match="choose one of " + ", ".join(names)):
            config(**{field: "no-such-choice"})
    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    flags = {a.dest: a.choices for a in train._actions if a.choices}
    # --estimator also takes import paths: no choices=, its help names every estimator
    estimator = next(a for a in train._actions if a.dest == "estimator")
    assert estimator.choices is None and ", ".join(ESTIMATORS) in estimator.help
    assert list(flags["dataset"]) == list(choices.DATASETS)
    assert list(flags["guide"]) == list(choices.GUIDES)


def test_library_errors_name_settings_and_only_the_cli_speaks_in_flags():
    from pyro_vae.app.cli import as_flags

    assert as_flags("lower `lr` or use `optimizer='clipped_adam'`") == (
        "lower --lr or use --optimizer clipped_adam"
    )
    assert as_flags("`latent_dims`, `kl_warmup_epochs`") == "--latent-dims, --kl-warmup"
    assert as_flags("`no_such_setting` stays") == "`no_such_setting` stays"
    flagged = []
    for path in PACKAGE.rglob("*.py"):
        if "app" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for part in ast.walk(node.exc):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        if re.search(r"(^|\s|\()--[a-z]", part.value):
                            flagged.append(f"{path.name}:{node.lineno}: {part.value!r}")
    assert not flagged, "library errors naming CLI flags:\n" + "\n".join(flagged)
