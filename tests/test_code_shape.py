"""The size rules of docs/design.md ("Size rules") for the product's code: no file past 400 lines,
no function past 60."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "persona_store")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def product_files() -> list[Path]:
    return [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]


def test_the_walk_reads_the_product() -> None:
    assert len(product_files()) > 80


def test_no_file_is_too_long() -> None:
    long_files = [
        f"{path.relative_to(ROOT)}: {lines} lines"
        for path in product_files()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    ]
    assert not long_files, "\n".join(long_files)


def test_no_function_is_too_long() -> None:
    long_functions = []
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}: {node.name} has {lines} lines")
    assert not long_functions, "\n".join(long_functions)
