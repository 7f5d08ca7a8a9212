"""Server-level behaviour: a bounded queue, a store that survives restarts, fuzzing for 5xx."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest

from testkit.server_process import ServerProcess
from tests.api_helpers import ADMIN_KEY, QUESTION, assert_openai_error, random_vector, upload

# Each test starts its own server (and schemathesis against it).
pytestmark = [pytest.mark.integration, pytest.mark.slow]  # servers restarted, schemathesis for a minute

MODEL = "solo-llama"
TESTS = Path(__file__).resolve().parent


def serve_args(llama_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(llama_dir), "--served-model-name", MODEL, "--data-dir", str(data_dir), *extra]


def test_a_full_queue_answers_429_and_personas_survive_a_restart(llama_dir: Path, tmp_path: Path) -> None:
    args = serve_args(
        llama_dir, tmp_path, "--max-num-seqs", "1", "--max-queue", "0", "--max-tokens-cap", "900"
    )
    with ServerProcess(args, log_path=tmp_path / "first.log") as server:
        # No admin key configured: loopback clients may administer, and the log says so.
        assert "admin routes accept loopback clients only" in server.log()
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "engines_down": {}}
        assert httpx.get(f"{server.url}/ready").json() == {
            "status": "ready",
            "models": [MODEL],
            "store": "ok",
            "change_feed": "none",  # SQLite: one process, nothing to follow
            "engines_down": {},
        }
        stored = upload(server.url, "keeper", MODEL, {1: random_vector(64, 11)}, 2.5, admin_key=None)
        assert stored.status_code == 200, stored.text

        long_body = {
            "model": MODEL,
            "messages": QUESTION,
            "max_tokens": 900,
            "stream": True,
            "ignore_eos": True,
        }
        started, release = threading.Event(), threading.Event()

        def occupy() -> None:
            # Holds the model's only place until released: its stream stays open.
            url = f"{server.url}/v1/chat/completions"
            with httpx.stream("POST", url, json=long_body, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        started.set()
                        release.wait(30)
                        return

        worker = threading.Thread(target=occupy)
        worker.start()
        assert started.wait(30)
        refused = httpx.post(
            f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 2}
        )
        error = assert_openai_error(refused, 429)
        assert error["type"] == "rate_limit_error" and refused.headers["Retry-After"] == "1"
        release.set()
        worker.join()

    with ServerProcess(serve_args(llama_dir, tmp_path), log_path=tmp_path / "second.log") as server:
        again = httpx.get(f"{server.url}/admin/personas/keeper", params={"model": MODEL}).json()
        assert again["checksum"] == stored.json()["checksum"] and again["version"] == 1
        assert again["layers"]["1"] == pytest.approx(random_vector(64, 11), rel=1e-6)
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 3, "persona": "keeper"}
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert answer.status_code == 200 and answer.json()["persona"]["strength"] == 2.5


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    llama_dir: Path, tmp_path: Path
) -> None:
    # Every operation, with valid and invalid data, as the admin, under every check: no 5xx; every
    # status, content type and body is one /openapi.json documents; no request the schema allows is
    # refused (but for the few rules it cannot state, tests/schemathesis_rules.py) and none it
    # forbids is taken. About a minute on two cores.
    args = serve_args(
        llama_dir, tmp_path, "--max-tokens-cap", "16", "--default-max-tokens", "8", "--admin-key", ADMIN_KEY
    )
    with ServerProcess(args, log_path=tmp_path / "server.log") as server:
        upload(server.url, "pirate", MODEL, {1: random_vector(64, 1)}, admin_key=ADMIN_KEY).raise_for_status()
        schema = httpx.get(f"{server.url}/openapi.json").json()
        operations = {f"{method.upper()} {path}" for path, item in schema["paths"].items() for method in item}
        junit = tmp_path / "schemathesis.xml"
        command = [
            *[sys.executable, "-m", "schemathesis.cli"],
            *["--config-file", str(TESTS / "schemathesis.toml"), "run", f"{server.url}/openapi.json"],
            *["--header", f"Authorization: Bearer {ADMIN_KEY}", "--checks", "all", "--mode", "all"],
            *["--max-examples", "100", "--phases", "coverage,fuzzing", "--generation-database", "none"],
            *["--seed", "1", "--workers", "1", "--request-timeout", "30", "--no-color"],
            *["--report", "junit", "--report-junit-path", str(junit)],
        ]
        hooks = {"SCHEMATHESIS_HOOKS": "tests.schemathesis_rules", "PYTHONPATH": str(TESTS.parent)}
        env = {**os.environ, **hooks, "PERSONA_DEFAULT_MAX_TOKENS": "8"}  # the server's default
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
        report = result.stdout[-6000:] + result.stderr[-2000:]
        assert result.returncode == 0, report
    # Its JUnit report has a test case per operation it ran: every one /openapi.json documents, none
    # failed, none skipped (as an operation is when no case could be generated for it).
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    ran = {case.get("name"): [child.tag for child in case] for case in cases}
    assert set(ran) == operations, report
    assert all(outcome == [] for outcome in ran.values()), {name: tags for name, tags in ran.items() if tags}
