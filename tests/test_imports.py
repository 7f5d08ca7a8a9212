"""The import direction of DESIGN.md, enforced: api -> serving -> {engine, steering, persona_store}.

Every import statement of server/ and persona_store/ is read (function-level ones too, which is
where lazy imports of optional engines hide) and checked against the rules below.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("server", "persona_store")
# Modules that name concrete engines or stores: the composition root and the engine registry.
COMPOSITION_ROOTS = {"server.app", "server.engine.registry"}
CONCRETE_ENGINES = ("server.engine.hf", "server.engine.llamacpp")
CONCRETE_STORES = ("persona_store.sqlite", "persona_store.redis")
LEAVES = {"server.settings", "server.metrics", "server.errors"}  # import nothing of ours
TEST_SUPPORT = "testkit"  # helpers for tests and benchmarks; the product never imports them


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def imported_modules(path: Path) -> Iterator[str]:
    """Every module of ours that ``path`` imports (``from a import b`` yields a.b when that is a
    module of ours, else a)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if is_module(name) else node.module for name in names]
        else:
            continue
        yield from (name for name in names if name.split(".")[0] in OURS)


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or None when the edge is allowed."""
    if within(importer, TEST_SUPPORT):
        return None
    if within(imported, TEST_SUPPORT):
        return "the product never imports its test support"
    if importer in LEAVES:
        return "settings, metrics and errors import nothing of ours"
    if within(importer, "persona_store") and within(imported, "server"):
        return "persona_store never imports server"
    if within(importer, "server.api") and within(
        imported, "server.engine", "server.demo", "server.cli", "server.app"
    ):
        return "api reaches the engines only through serving"
    if within(importer, "server.serving") and within(
        imported, "server.api", "server.demo", "server.cli", "server.app"
    ):
        return "serving never imports the layers above it nor the demo"
    if within(importer, "server.engine") and within(
        imported, "server.serving", "server.api", "server.demo", "server.cli", "server.app", "persona_store"
    ):
        return "engines know only steering plans, not requests, personas or stores"
    if within(importer, "server.steering") and not within(imported, "server.steering", "server.errors"):
        return "steering is pure maths on vectors"
    if (
        within(imported, *CONCRETE_ENGINES)
        and importer not in COMPOSITION_ROOTS
        and not within(importer, *(p for p in CONCRETE_ENGINES if within(imported, p)))
    ):
        return "only app.py and the engine registry name concrete engines"
    store_owner = importer == "server.app" or within(importer, "persona_store")
    if within(imported, *CONCRETE_STORES) and not store_owner:
        return "only app.py names concrete stores"
    return None


def edges() -> list[tuple[str, str]]:
    found = []
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            found += [(module_name(path), imported) for imported in imported_modules(path)]
    return found


def test_the_walk_sees_the_imports_it_checks() -> None:
    found = set(edges())
    assert ("server.app", "server.engine.registry") in found
    assert ("server.engine.registry", "server.engine.hf.backend") in found  # a function-level import
    assert len(found) > 150


def test_no_module_imports_against_the_direction_of_the_layers() -> None:
    broken = [f"{a} -> {b}: {why}" for a, b in edges() if (why := violation(a, b))]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("server.api.routes.openai", "server.engine.base"),
        ("server.serving.mapping_fits", "server.demo.corpus"),
        ("server.cli.generate", "server.engine.hf.backend"),
        ("persona_store.sqlite", "server.steering.plan"),
        ("server.serving.completions", "persona_store.redis"),
        ("server.metrics", "server.serving.errors"),
        ("server.steering.plan", "server.engine.base"),
    ],
)
def test_a_forbidden_edge_is_caught(importer: str, imported: str) -> None:
    assert violation(importer, imported) is not None


def module_level_mutables(path: Path) -> Iterator[str]:
    """Module-level names bound to a mutable container (constants are UPPER_CASE by convention) and
    ``global`` statements: state that outlives a request and is shared by every app in a process."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            yield f"{path.name}:{node.lineno}: global {', '.join(node.names)}"
    mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        value = getattr(node, "value", None)
        is_mutable = isinstance(value, mutable) or (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id in {"dict", "list", "set", "defaultdict"}
        )
        for target in targets:
            named = isinstance(target, ast.Name) and target.id != "__all__"
            if is_mutable and named and not target.id.isupper():
                yield f"{path.name}:{node.lineno}: {target.id}"


def test_no_module_level_mutable_state() -> None:
    found = [
        finding
        for package in OURS
        for path in sorted((ROOT / package).rglob("*.py"))
        for finding in module_level_mutables(path)
    ]
    assert not found, "\n".join(found)
