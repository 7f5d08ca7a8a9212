"""The Dockerfile and docker-compose.yml parse and name only what exists (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic_settings import CliApp

from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_wires_the_server_to_a_healthy_redis_with_aof() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    redis, server = compose["services"]["redis"], compose["services"]["server"]
    assert (
        "--appendonly" in redis["command"]
        and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    )
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/ready" in " ".join(server["healthcheck"]["test"])
    assert (ROOT / server["build"] / "Dockerfile").is_file()
    # The compose command is the server command the tests start: every flag is a real setting.
    command = server["command"]
    assert command[0] == "serve"
    settings = CliApp.run(Settings, cli_args=command[1:])
    assert settings.store == "redis://redis:6379/0" and settings.host == "0.0.0.0"


def test_dockerfile_copies_only_what_the_repository_has() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert 'ENTRYPOINT ["persona-server"]' in dockerfile
