"""The tree is the architecture (ARCHITECTURE §1): layers import downwards only, no module
reaches into another's private names, and only the library's two faces start processes."""

from __future__ import annotations

import ast
import importlib
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flstore_core", "lambdas", "pipelines", "evaluation", "benchmarks", "infra", "tests")
FACES = ("flstore_core/cli", "flstore_core/integrations")


def modules(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    if not path.is_relative_to(ROOT):
        return path.stem
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST) -> Iterator[tuple[str, list[str]]]:
    """``(module, names)`` of every import in a tree (names empty for ``import x``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def is_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def private_uses(path: Path) -> list[str]:
    """Private names of *other* project modules that ``path`` imports or reads as attributes."""
    tree = ast.parse(path.read_text())
    own = module_name(path)
    found = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and is_project(node.module):
            for a in node.names:
                if node.module != own and a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"from {node.module} import {a.name}")
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if is_project(a.name):
                    aliases[a.asname or a.name.split(".")[0]] = (a.asname and a.name) or a.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{aliases[node.value.id]}.{node.attr}")
    return found


@pytest.mark.parametrize(
    "path",
    list(modules("flstore_core", "lambdas", "pipelines", "evaluation", "benchmarks")),
    ids=rel,
)
def test_no_module_uses_another_modules_private_names(path: Path) -> None:
    assert private_uses(path) == []


@pytest.mark.parametrize("path", list(modules("flstore_core")), ids=rel)
def test_the_library_imports_nothing_above_it(path: Path) -> None:
    """``flstore_core`` never imports lambdas, pipelines, infra, benchmarks or evaluation;
    its faces (``cli/``, ``integrations/``) may compose the layers, and nothing else in the
    library imports the faces."""
    face = rel(path).startswith(FACES)
    for module, _ in imported(ast.parse(path.read_text())):
        top = module.split(".")[0]
        if not face:
            assert top not in {"lambdas", "pipelines", "infra", "benchmarks", "evaluation"}, module
            assert not module.startswith(("flstore_core.cli", "flstore_core.integrations")), module
        assert top not in {"infra", "benchmarks", "tests"}, module


@pytest.mark.parametrize("path", list(modules("lambdas", "pipelines")), ids=rel)
def test_handlers_and_pipelines_never_import_evaluation(path: Path) -> None:
    for module, _ in imported(ast.parse(path.read_text())):
        assert module.split(".")[0] not in {"evaluation", "benchmarks", "infra"}, module


@pytest.mark.parametrize("path", list(modules("flstore_core")), ids=rel)
def test_only_the_faces_of_the_library_start_processes(path: Path) -> None:
    if rel(path).startswith(FACES):
        return
    for module, names in imported(ast.parse(path.read_text())):
        assert module not in {"subprocess", "multiprocessing"}, module
        assert not (module == "os" and {"fork", "system", "spawnv"} & set(names)), module


def test_the_readme_architecture_table_is_the_tree() -> None:
    """Every path the README's architecture table names exists, and every subpackage of the
    library and every top-level package is named in it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    named = {
        cell.strip("`").rstrip("/")
        for line in section.splitlines()
        if line.startswith("|")
        for cell in line.split("|")[2].split(",")
        for cell in [cell.strip()]
        if cell.startswith("`")
    }
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"the README names paths that do not exist: {missing}"
    subpackages = {rel(p.parent) for p in (ROOT / "flstore_core").glob("*/__init__.py")}
    tops = {"lambdas", "pipelines", "infra", "evaluation", "benchmarks", "tests", "docs"}
    assert (subpackages | tops) <= named, sorted((subpackages | tops) - named)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("flstore_core.client", "FLStoreClient"),
        ("flstore_core.integrations.flower", "with_flstore"),
        ("flstore_core.models", "build"),
        ("lambdas.local_runtime.stack", "LocalStack"),
        ("lambdas.local_runtime.stack", "StackConfig"),
        ("evaluation.baselines", "Aggregator"),
        ("flstore_core.cli", "main"),
    ],
)
def test_names_users_and_tools_import_keep_working(module: str, name: str) -> None:
    """ARCHITECTURE §1: these stay importable whatever moves."""
    assert callable(getattr(importlib.import_module(module), name))


def test_the_flstore_command_is_the_cli_entry_point() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["flstore"] == "flstore_core.cli:main"
    packaged = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "evaluation*" in packaged  # `flstore demo` runs from an installed wheel
