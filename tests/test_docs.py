"""The README and the docs site stay whole: the site builds strictly (a broken link or anchor fails), the
README stays short with its links into docs/ resolving, its test command is .ci/run's, and a threshold
a page states for a test is the one the test asserts."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
import unicodedata
from pathlib import Path

import pytest

from tests import test_code_shape

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAX_README_LINES = 260
MAX_README_WIDTH = 120  # but for the test command, which is .ci/run's line as it is


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [*command, "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()


def readme_test_command() -> str:
    commands = [
        line for line in README.read_text(encoding="utf-8").splitlines() if "python -m pytest" in line
    ]
    assert len(commands) == 1, commands
    return commands[0]


def test_the_readme_stays_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES
    command = readme_test_command()
    wide = [n for n, line in enumerate(lines, 1) if len(line) > MAX_README_WIDTH and line != command]
    assert not wide, f"README lines wider than {MAX_README_WIDTH}: {wide}"


def test_the_readme_test_command_is_what_ci_runs() -> None:
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci_lines[-1] == readme_test_command()


def test_the_test_command_installs_the_docs_extra() -> None:
    extras = re.search(r"pip install -q -e '\.\[([a-z,]+)\]'", readme_test_command())
    assert extras and "docs" in extras[1].split(",")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {re.split(r"[<>=\[; ]", spec)[0] for spec in project["optional-dependencies"]["docs"]}
    assert {"mkdocs", "mkdocs-material"} <= names


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (mkdocs' default) gives a heading."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_every_readme_link_into_the_docs_resolves() -> None:
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", README.read_text(encoding="utf-8"))
    assert len(links) > 10
    broken = []
    for target, anchor in links:
        path = ROOT / target
        if not path.is_file() or (anchor and anchor not in anchors(path)):
            broken.append(f"{target}#{anchor}" if anchor else target)
    assert not broken, broken


def source_of(path: str, function: str | None = None) -> str:
    source = (ROOT / "tests" / path).read_text(encoding="utf-8")
    if function is None:
        return source
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == function]
    assert len(nodes) == 1, f"{path} has no single {function}"
    return ast.get_source_segment(source, nodes[0]) or ""


def written(source: str, pattern: str) -> str:
    """The one number ``pattern`` (a regex with one group) finds in a test's source, as written there."""
    found = set(re.findall(pattern, source))
    assert len(found) == 1, f"{pattern!r} found {sorted(found)}"
    return found.pop()


def asserted(source: str, pattern: str) -> float:
    return float(written(source, pattern))


def g(number: float) -> str:
    return f"{number:g}"


def threshold_claims() -> list[tuple[str, str]]:
    """(page, the sentence the page must hold), each sentence built from the test's own numbers."""
    huge = source_of(
        "test_api_input_limits.py", "test_a_20_mb_prompt_is_refused_while_health_and_streams_go_on"
    )
    health, gap, grown = (
        asserted(huge, p)
        for p in (r"health\.slowest < ([\d.]+)", r"gap < ([\d.]+)", r"grown_mb\(\) < ([\d.]+)")
    )
    large_health = asserted(source_of("test_api_large_requests.py"), r"health\.slowest <= ([\d.]+)")
    schemathesis = source_of(
        "test_api_lifecycle.py", "test_schemathesis_finds_no_server_error_and_no_undocumented_answer"
    )
    examples = asserted(schemathesis, r'"--max-examples", "(\d+)"')
    seed = asserted(schemathesis, r'"--seed", "(\d+)"')
    transfer = source_of("test_transfer_protocol.py")
    cosine_qwen = asserted(transfer, r"assert cosine > ([\d.]+)")
    cosine_self = asserted(transfer, r"\) > ([\d.]+), block")
    scale_low, scale_high = (
        asserted(transfer, r"assert ([\d.]+) <= carried"),
        asserted(transfer, r"scale <= ([\d.]+)"),
    )
    lines, function = test_code_shape.MAX_FILE_LINES, test_code_shape.MAX_FUNCTION_LINES
    number = r"([0-9][0-9e.-]*)"
    gguf_blocks = written(source_of("test_gguf_backend.py"), r"np\.abs\(gguf - hf\)\.max\(\) < " + number)
    baked = written(source_of("test_baking_gguf.py"), r"\.max\(\) < " + number)
    vllm_reads = written(source_of("test_vllm_engine.py"), r"atol=" + number)
    gguf_loops = written(
        source_of("test_api_closed_loop.py"), r"approx\(readings\[0\], rel=[0-9e.-]+, abs=" + number
    )
    return [
        ("design.md", f"at most {lines} lines per file and {function} per function"),
        (
            "operations.md",
            f"`/health` answers within {g(health)} s; the stream never waits {g(gap)} s or more; the server"
            f" keeps less than {g(grown)} MB",
        ),
        ("operations.md", f"`/health` within {g(large_health)} s (before"),
        ("operations.md", f"({g(examples)} examples per operation, seed {g(seed)}:"),
        ("mapping.md", f"asserts a cosine above {g(cosine_qwen)} at every block"),
        ("engines/llama-cpp.md", f"(max abs diff < {gguf_blocks}, tested)"),
        ("baking.md", f"(max difference < {baked} on"),
        ("engines/vllm.md", f"read-backs equal the HF engine's within {vllm_reads};"),
        ("closed-loop.md", f"give the same answer, readings (within {gguf_loops}), strengths"),
        (
            "results/transfer.md",
            f"a cosine above {g(cosine_self)} at every block and a scale within"
            f" {g(scale_low)}-{g(scale_high)}",
        ),
    ]


def product_constant(name: str) -> int:
    """A module-level integer constant of the product, wherever its module lives."""
    found = {
        int(m[1])
        for path in (ROOT / "server").rglob("*.py")
        if (m := re.search(rf"^{name} = (\d+)", path.read_text(encoding="utf-8"), flags=re.MULTILINE))
    }
    assert len(found) == 1, f"{name}: {sorted(found)}"
    return found.pop()


def test_the_bake_bounds_the_docs_state_are_the_servers() -> None:
    rank, answers, steps, tokens, prompts = (
        product_constant(f"MAX_BAKE_{name}")
        for name in ("RANK", "TRAJECTORIES", "STEPS", "TOKENS", "PROMPTS")
    )
    sentence = (
        f"`rank` <= {rank}, `trajectories` <= {answers}, `steps` <= {steps}, `max_tokens` <= {tokens},"
        f" up to {prompts:,} `prompts`"
    )
    assert sentence in " ".join((DOCS / "baking.md").read_text(encoding="utf-8").split())


@pytest.mark.parametrize(("page", "sentence"), threshold_claims())
def test_a_threshold_the_docs_state_is_the_tests_threshold(page: str, sentence: str) -> None:
    text = " ".join((DOCS / page).read_text(encoding="utf-8").split())
    assert sentence in text, f"docs/{page} should say: {sentence}"


def test_every_marker_is_documented() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"][
        "ini_options"
    ]
    names = {marker.split(":")[0].strip() for marker in declared["markers"]}
    page = (DOCS / "development.md").read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"| `{name}` |" not in page)
    assert not missing, f"docs/development.md, Markers, lacks {missing}"


def test_every_metric_is_documented() -> None:
    names = set(
        re.findall(
            r'"(persona_server_[a-z_]+)"', (ROOT / "server" / "metrics.py").read_text(encoding="utf-8")
        )
    )
    assert len(names) > 10
    page = (DOCS / "operations.md").read_text(encoding="utf-8")
    assert not sorted(name for name in names if name not in page)


def features_table(text: str) -> list[str]:
    return [
        line
        for line in text.split("## Features by engine")[1].split("\n## ")[0].splitlines()
        if line.startswith("|")
    ]


def test_the_features_table_is_the_same_in_the_readme_and_the_docs() -> None:
    readme = features_table(README.read_text(encoding="utf-8"))
    assert len(readme) > 10 and readme == features_table((DOCS / "index.md").read_text(encoding="utf-8"))


CODE_PATH = re.compile(r"\b(?:server|persona_store|testkit|tests|loadtests|deploy)/[\w/.-]*\w")


def test_every_file_the_docs_name_exists() -> None:
    """A page that sends a reader to a module sends them to one that exists: after a move, the docs
    follow (the code map in docs/design.md above all)."""
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    missing = [
        f"{page.relative_to(ROOT)}: {path}"
        for page in pages
        for path in CODE_PATH.findall(page.read_text(encoding="utf-8"))
        if not (ROOT / path).exists() and not (ROOT / path).with_suffix("").exists()
    ]
    assert not missing, missing
