"""docs/architectures.md's table of model types by engine is the test suite's own: a cell says
"tested" exactly when the suite collects the test behind that column for that model type, and a
llama.cpp cell names the converter's reason where it refuses the type. Print the table the suite
implies with ``python -m tests.test_coverage_table``."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

from server.engine.vllm.model_types import BLOCK_OUTPUTS
from server.gguf.model import NOT_CONVERTIBLE
from testkit.tiny_models import SUPPORTED_ARCHITECTURES

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architectures.md"
BEGIN, END = "<!-- coverage table: begin -->", "<!-- coverage table: end -->"

# Column -> the tests whose parametrised cases stand behind it (one case per model type each).
VLLM_ENGINE, VLLM_TYPES = "tests/test_vllm_engine.py", "tests/test_vllm_architectures.py"
COLUMNS: dict[str, tuple[str, ...]] = {
    "HF: steering = hand computation, every position rule": (
        "tests/test_steering_reference.py::test_steered_logits_match_hand_computation",
    ),
    "HF: personas mixed in a batch = each alone": (
        "tests/test_architectures.py::test_personas_mixed_in_a_batch_answer_as_each_alone",
    ),
    "HF: monitoring in flight = read-back": (
        "tests/test_architectures.py::test_monitoring_in_flight_equals_the_read_back",
    ),
    "llama.cpp: logits and steering = HF": (
        "tests/test_gguf_backend.py::test_logits_equal_hf_unsteered_and_steered_at_each_block",
    ),
    "vLLM: steered greedy tokens = HF, every rule": (
        f"{VLLM_ENGINE}::test_greedy_tokens_equal_the_hf_engine_unsteered_and_at_every_rule",
        f"{VLLM_TYPES}::test_steered_greedy_tokens_equal_the_hf_engine_at_every_rule",
    ),
    "vLLM: personas mixed in a batch = each alone": (
        f"{VLLM_ENGINE}::test_twelve_concurrent_requests_with_different_personas_equal_their_solo_answers",
        f"{VLLM_TYPES}::test_personas_mixed_in_one_batch_equal_each_alone",
    ),
    "vLLM: monitoring in flight = HF read-back": (
        f"{VLLM_ENGINE}::test_monitored_answers_are_read_in_flight_as_the_hf_engine_reads_them_back",
        f"{VLLM_TYPES}::test_read_backs_and_monitoring_equal_the_hf_engine",
    ),
}


@cache
def collected() -> tuple[str, ...]:
    """The ids of every case the suite collects from the modules behind the columns."""
    modules = sorted({test.split("::")[0] for tests in COLUMNS.values() for test in tests})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tuple(line for line in result.stdout.splitlines() if "::" in line)


def covers(tests: tuple[str, ...], architecture: str) -> bool:
    """Whether one of ``tests`` has a case for ``architecture`` (a whole token of its parameter id)."""
    for case in collected():
        name, _, parameters = case.partition("[")
        if name in tests and architecture in re.split(r"[-\[\]]", parameters):
            return True
    return False


def cell(column: str, architecture: str) -> str:
    if covers(COLUMNS[column], architecture):
        return "tested"
    refused = NOT_CONVERTIBLE.get(architecture)
    if column.startswith("llama.cpp") and refused:
        return f"not supported ({refused.split(':')[0]})"  # the reason's head; the page says the rest
    return "not tested yet"


def expected_table() -> str:
    lines = ["| model type | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [
        f"| `{architecture}` | " + " | ".join(cell(column, architecture) for column in COLUMNS) + " |"
        for architecture in SUPPORTED_ARCHITECTURES
    ]
    return "\n".join(lines)


def test_the_coverage_table_is_the_suites() -> None:
    text = PAGE.read_text(encoding="utf-8")
    written = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    expected = expected_table()
    assert written == expected, f"docs/architectures.md should hold:\n{expected}"


def test_every_column_names_a_test_that_exists() -> None:
    """A renamed test would turn its column to "not tested yet" silently: each test behind a column
    has cases, and the dense Llama has one in each column (a row the table can never lose)."""
    assert all(covers(tests, "llama") for tests in COLUMNS.values())
    names = {case.partition("[")[0] for case in collected()}
    assert all(test in names for tests in COLUMNS.values() for test in tests)


def test_the_vllm_engine_accepts_exactly_the_types_its_tests_cover() -> None:
    """server/engine/vllm/model_types.py refuses a type at load unless every vLLM column of the
    table is "tested" for it (issue 31, item 8): a type may join the list only with its tests."""
    vllm_columns = [column for column in COLUMNS if column.startswith("vLLM")]
    covered = {
        architecture
        for architecture in SUPPORTED_ARCHITECTURES
        if all(covers(COLUMNS[column], architecture) for column in vllm_columns)
    }
    assert set(BLOCK_OUTPUTS) == covered


if __name__ == "__main__":
    print(expected_table())
