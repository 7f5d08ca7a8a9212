"""The test suite and the benchmarks stand apart: neither imports the other. What both need lives in
``testkit`` (test_imports.py keeps the product from importing that)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize(("folder", "other"), [("tests", "loadtests"), ("loadtests", "tests")])
def test_tests_and_loadtests_do_not_import_each_other(folder: str, other: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(bad)
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (bad := {m for m in imported_modules(path) if m == other or m.startswith(f"{other}.")})
    }
    assert offenders == {}, f"{folder}/ imports {other}/; move what both need into testkit/"
