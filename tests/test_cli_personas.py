"""`persona-server personas ...` against a real server: upload, list, export, import, versions, restore."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from persona_store.formats import read_gguf_control_vector
from server.cli import app
from testkit.server_process import ServerProcess
from tests.api_helpers import ADMIN_KEY, LLAMA, random_vector

pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp]  # the session server


def run(server: ServerProcess, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["personas", *args, "--url", server.url], env={"PERSONA_SERVER_ADMIN_KEY": ADMIN_KEY}
    )
    return result.exit_code, result.output


def test_an_operator_round_trip_through_the_cli(server: ServerProcess, tmp_path: Path) -> None:
    body = tmp_path / "sailor.json"
    upload = {"model": LLAMA, "layers": {"2": random_vector(64, 8)}, "default_strength": 2.0}
    body.write_text(json.dumps({**upload, "report": {"ignored": True}}))
    assert run(server, "upload", str(body), "--name", "sailor") == (
        0,
        f"stored sailor for {LLAMA}: version 1, blocks [2]\n",
    )
    code, listed = run(server, "list", "--model", LLAMA)
    assert code == 0 and f"sailor\t{LLAMA}\tv1\tblocks 2" in listed.splitlines()

    code, written = run(server, "export", "sailor", "--model", LLAMA, "--format", "gguf", "-o", str(tmp_path))
    assert code == 0 and written.startswith(f"wrote {tmp_path / 'sailor.v1.gguf'}")
    exported = read_gguf_control_vector((tmp_path / "sailor.v1.gguf").read_bytes())
    assert list(exported.vectors) == [2]

    gguf = str(tmp_path / "sailor.v1.gguf")
    flags = ["--name", "sailor", "--model", LLAMA, "--default-strength", "3", "--if-match", "1"]
    imported = run(server, "import", gguf, *flags)
    assert imported == (0, f"stored sailor for {LLAMA}: version 2, blocks [2]\n")
    code, versions = run(server, "versions", "sailor", "--model", LLAMA)
    assert code == 0 and [line.split("\t")[:2] for line in versions.splitlines()] == [
        ["v2", "imported"],
        ["v1", "uploaded"],
    ]
    assert run(server, "restore", "sailor", "--model", LLAMA, "--version", "1") == (
        0,
        "restored sailor v1 as version 3\n",
    )
    assert run(server, "delete", "sailor", "--model", LLAMA, "--if-match", "3")[0] == 0


def test_cli_errors_say_what_went_wrong_and_exit_1(server: ServerProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    code, output = run(server, "import", str(bad), "--name", "broken", "--model", LLAMA)
    assert code == 1 and output.startswith("error: 400: not a valid safetensors file")
    code, output = run(server, "versions", "never-stored", "--model", LLAMA)
    assert code == 1 and "404" in output and "never-stored" in output
    result = CliRunner().invoke(app, ["personas", "list", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1:9" in result.output
