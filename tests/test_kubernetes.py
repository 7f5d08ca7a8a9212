"""The Kubernetes manifests (deploy/kubernetes, docs/kubernetes.md) as `kubectl apply -k` would send
them: rendered by kubectl's own kustomize, every object valid against the Kubernetes API schema of
KUBERNETES_VERSION, the containers' commands accepted by the server's real CLI, probes and ports the
server really serves, the admin key taken from a Secret and never shipped, and the autoscaler's metric
one that a running server exports."""

from __future__ import annotations

import json
import signal
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic_settings import CliApp

from server.settings import Settings
from testkit.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.32.0"  # the oldest Kubernetes the manifests are checked against
VARIANTS = ("", "vllm")  # deploy/kubernetes and deploy/kubernetes/vllm (monitoring: its own test)
ADMIN_SECRET, ADMIN_KEY_ENTRY = "persona-server-admin", "admin-key"


@cache
def rendered(variant: str) -> tuple[dict[str, Any], ...]:
    """What `kubectl apply -k deploy/kubernetes/<variant>` applies (kubectl's built-in kustomize)."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES / variant)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(variant: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered(variant) if doc["kind"] == kind]


def server_containers(variant: str) -> list[dict[str, Any]]:
    """The persona-server containers of a variant's Deployments."""
    containers = [
        c for d in of_kind(variant, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]
    ]
    return [
        c for c in containers if c["image"].split(":")[0].endswith(("persona-server", "persona-server-vllm"))
    ]


def settings_of(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The container's command parsed by the server's own CLI (`persona-server serve ...`)."""
    assert container["args"][0] == "serve"
    monkeypatch.setenv("PERSONA_SERVER_ADMIN_KEY", "from-the-secret")
    return CliApp.run(Settings, cli_args=container["args"][1:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_valid_against_the_kubernetes_api_schema(variant: str) -> None:
    kinds = [doc["kind"] for doc in rendered(variant)]
    assert {"Deployment", "Service", "StatefulSet", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(
        kinds
    )
    for doc in rendered(variant):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    alternative = yaml.safe_load((KUBERNETES / "alternatives" / "hpa-cpu.yaml").read_text())
    kubernetes_validate.validate(alternative, KUBERNETES_VERSION, strict=True)


def test_a_field_kubernetes_does_not_know_is_caught() -> None:
    """The check above can fail: strict validation refuses what the schema does not name."""
    deployment = json.loads(json.dumps(of_kind("", "Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["startupprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_commands_parse_and_the_probes_and_ports_are_the_servers(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.app import create_app

    routes = {route.path for route in create_app(Settings()).routes}
    containers = server_containers(variant)
    assert len(containers) == (2 if variant == "vllm" else 1)
    for container in containers:
        settings = settings_of(container, monkeypatch)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"http": settings.port, "metrics": settings.metrics_port}
        assert settings.host == "0.0.0.0" and settings.store.startswith("redis://persona-server-redis:6379")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] in routes and get["port"] == "http", (probe, get)
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for deployment in of_kind(variant, "Deployment"):
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == "9100" and annotations["prometheus.io/path"] in routes
    services = {s["metadata"]["name"]: s for s in of_kind(variant, "Service")}
    assert services["persona-server"]["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http"}
    ]
    assert services["persona-server-metrics"]["spec"]["ports"][0]["targetPort"] == "metrics"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_admin_key_comes_from_a_secret_the_user_creates(variant: str) -> None:
    assert not of_kind(variant, "Secret")
    tracked = subprocess.run(["git", "ls-files", "deploy"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "kind: Secret" not in "".join((ROOT / path).read_text() for path in tracked.split())
    for container in server_containers(variant):
        env = {entry["name"]: entry for entry in container["env"]}
        reference = env["PERSONA_SERVER_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
        assert reference == {"name": ADMIN_SECRET, "key": ADMIN_KEY_ENTRY}


def test_the_vllm_pod_splits_the_model_over_every_gpu_it_asks_for(monkeypatch: pytest.MonkeyPatch) -> None:
    (deployment,) = [
        d for d in of_kind("vllm", "Deployment") if d["metadata"]["name"] == "persona-server-vllm"
    ]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    settings = settings_of(container, monkeypatch)
    assert settings.engine == "vllm"
    assert settings.tensor_parallel_size == int(container["resources"]["limits"]["nvidia.com/gpu"])
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    model_claim = volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
    assert model_claim in {claim["metadata"]["name"] for claim in of_kind("vllm", "PersistentVolumeClaim")}
    assert settings.model and all(model.startswith("/models/") for model in settings.model)


def test_redis_keeps_an_append_only_file_on_a_claimed_volume() -> None:
    (redis,) = of_kind("", "StatefulSet")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert (
        "--appendonly" in container["args"]
        and container["args"][container["args"].index("--appendonly") + 1] == "yes"
    )
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]


def test_monitoring_scrapes_the_metrics_service_and_ships_the_dashboard() -> None:
    (monitor,) = of_kind("monitoring", "ServiceMonitor")
    (metrics,) = [s for s in of_kind("", "Service") if s["metadata"]["name"] == "persona-server-metrics"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {port["name"] for port in metrics["spec"]["ports"]}
    (dashboard,) = of_kind("monitoring", "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (ROOT / "deploy" / "grafana" / "dashboards" / "persona-server.json").read_text()
    assert json.loads(dashboard["data"]["persona-server.json"]) == json.loads(shipped)


@pytest.mark.integration
@pytest.mark.llama_cpp  # the suite's shared server serves a GGUF model too
def test_the_autoscalers_metric_is_one_a_running_server_exports(server: ServerProcess) -> None:
    (autoscaler,) = of_kind("", "HorizontalPodAutoscaler")
    names = [metric["pods"]["metric"]["name"] for metric in autoscaler["spec"]["metrics"]]
    exported = {
        family.name for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    }
    assert names and set(names) <= exported
    assert autoscaler["spec"]["scaleTargetRef"]["name"] in {
        d["metadata"]["name"] for d in of_kind("", "Deployment")
    }


@pytest.mark.integration
@pytest.mark.slow
def test_a_stopped_pod_finishes_the_answers_it_is_writing_and_takes_no_new_ones(
    llama_dir: Path, tmp_path: Path
) -> None:
    """docs/kubernetes.md, "When a pod goes away": Kubernetes stops a pod with SIGTERM; an answer being
    streamed then runs to its end, and the port takes no new connection."""
    with ServerProcess(["--model", str(llama_dir)], log_path=tmp_path / "server.log") as server:
        body = {
            "model": llama_dir.name,
            "prompt": "the sea",
            "max_tokens": 300,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as answer:
            lines = answer.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            server.terminate()
            rest = [line for line in lines if line.startswith("data: ")]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/health", timeout=5)
        chunks = [json.loads(line.removeprefix("data: ")) for line in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]" and chunks[-1]["usage"]["completion_tokens"] == 300
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        # uvicorn shuts down in order, then re-raises the signal: the exit status says SIGTERM.
        assert server.wait() == -signal.SIGTERM
        assert "Application shutdown complete." in server.log()
