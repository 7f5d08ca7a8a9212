"""The import rules of docs/design.md ("Layers and import rules"), enforced.

The product's layers, each importing only those below it:

- ``server.api`` (HTTP) -> ``server.serving`` (the request path) and ``server.admin`` (operator
  services and jobs) -> ``server.engine``, ``server.steering``, ``persona_store``;
- ``server.admin`` also uses ``server.transfer`` (carrying a persona to another model),
  ``server.baking`` (LoRA bakes) and ``server.gguf`` (GGUF writers, through baking); the request
  path uses none of them;
- ``server.transfer`` drives engines (their protocol, and ``server.engine.answers`` to answer and
  read back) and steering maths only: no requests, stores or services;
- ``server.steering`` is pure maths on vectors; ``server.gguf`` reads HF weights and knows no engine;
- engines know steering plans, never requests, personas or stores; only ``server.app`` and the engine
  registry name a concrete engine, and only ``server.app`` a concrete store;
- ``server.evaluation`` (the measured tables) is never imported by the product: only by
  ``persona-server eval`` (``server.cli.evaluate``) and the demo build (``server.demo.build``);
- ``testkit`` (test and benchmark support, not installed) is never imported by the product.

Every import statement of server/, persona_store/ and testkit/ is read (function-level ones too,
which is where lazy imports of optional engines hide) and checked against the rules below.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("server", "persona_store", "testkit")
PRODUCT = ("server", "persona_store")
# Modules that name concrete engines or stores: the composition root and the engine registry.
COMPOSITION_ROOTS = {"server.app", "server.engine.registry"}
CONCRETE_ENGINES = ("server.engine.hf", "server.engine.llamacpp")
CONCRETE_STORES = ("persona_store.sqlite", "persona_store.redis")
LEAVES = {"server.settings", "server.metrics", "server.errors"}  # import nothing of ours
TEST_SUPPORT = "testkit"  # helpers for tests and benchmarks; the product never imports them
EVALUATION = "server.evaluation"
EVALUATION_USERS = ("server.evaluation", "server.cli.evaluate", "server.demo.build")
ENTRY_POINTS = ("server.cli", "server.app", "server.__main__")
# What the request path stands below: the layers that use it, and the offline work beside them.
ABOVE_SERVING = (
    "server.api",
    "server.admin",
    "server.transfer",
    "server.baking",
    "server.gguf",
    "server.demo",
)
# What a layer may never import, with the reason.
FORBIDDEN: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "server.api",
        ("server.engine", "server.transfer", "server.baking", "server.gguf", "server.demo", *ENTRY_POINTS),
        "api reaches the engines only through serving and admin",
    ),
    (
        "server.serving",
        (*ABOVE_SERVING, *ENTRY_POINTS),
        "the request path never imports the layers above it, the admin services, nor the demo",
    ),
    (
        "server.admin",
        ("server.api", "server.demo", *ENTRY_POINTS),
        "admin services never import the HTTP layer, the demo nor the entry points",
    ),
    (
        "server.baking",
        ("server.api", "server.admin", "server.transfer", "server.demo", *ENTRY_POINTS),
        "a bake is used by admin and the CLI, and uses neither",
    ),
    (
        "server.engine",
        ("server.serving", *ABOVE_SERVING, *ENTRY_POINTS, "persona_store"),
        "engines know only steering plans, not requests, personas or stores",
    ),
)
ALLOWED_ONLY: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("server.steering", ("server.steering", "server.errors"), "steering is pure maths on vectors"),
    (
        "server.transfer",
        (
            "server.transfer",
            "server.engine.base",
            "server.engine.answers",
            "server.steering",
            "server.errors",
        ),
        "transfer carries vectors with engines and steering maths: no requests, stores or services",
    ),
    (
        "server.gguf",
        ("server.gguf", "server.engine.model_loading"),
        "the GGUF writers read HF weights: they know no engine, request or store",
    ),
)


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
    if within(imported, EVALUATION) and not within(importer, *EVALUATION_USERS):
        return "evaluation code is never imported by the product (only by the eval CLI and the demo build)"
    if importer in LEAVES:
        return "settings, metrics and errors import nothing of ours"
    if within(importer, "persona_store") and within(imported, "server"):
        return "persona_store never imports server"
    for layer, forbidden, why in FORBIDDEN:
        if within(importer, layer) and within(imported, *forbidden):
            return why
    for layer, allowed, why in ALLOWED_ONLY:
        if within(importer, layer) and not within(imported, *allowed):
            return why
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
        ("server.admin.mapping_fits", "server.demo.corpus"),
        ("server.serving.completions", "server.admin.jobs"),
        ("server.serving.personas", "server.transfer.carry"),
        ("server.admin.persona_mapping", "server.evaluation.transfer_table"),
        ("server.app", "server.evaluation.strength_sweep"),
        ("server.transfer.carry", "persona_store.records"),
        ("server.transfer.carry", "server.serving.model_registry"),
        ("server.gguf.model", "server.engine.llamacpp.backend"),
        ("server.api.routes.admin", "server.transfer.strength_calibration"),
        ("server.baking.bake", "server.admin.jobs"),
        ("server.cli.serve", "testkit.server_process"),
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
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
        for finding in module_level_mutables(path)
    ]
    assert not found, "\n".join(found)
