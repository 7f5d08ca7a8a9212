"""Who may reach /admin with no admin key, and /metrics with a metrics key, on a real uvicorn.

uvicorn is told to trust every proxy (FORWARDED_ALLOW_IPS=*), so X-Forwarded-For rewrites the client
address the app sees: a forged header must still never make a request local.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.server_process import ServerProcess
from tests.api_helpers import assert_openai_error

pytestmark = pytest.mark.integration  # a real uvicorn

METRICS_KEY = "metrics-secret"


@pytest.fixture(scope="module")
def server(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("access")
    args = [
        "--model",
        str(llama_dir),
        "--data-dir",
        str(data),
        "--host",
        "0.0.0.0",
        "--metrics-key",
        METRICS_KEY,
    ]
    env = {"FORWARDED_ALLOW_IPS": "*"}
    with ServerProcess(args, env=env, log_path=data / "server.log") as process:
        yield process


def _outward_address() -> str | None:
    """This machine's address on a non-loopback interface (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


@pytest.mark.parametrize(
    "headers",
    [{"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"}, {"X-Real-IP": "127.0.0.1"}, {}],
    ids=["x-forwarded-for", "forwarded", "x-real-ip", "no-header"],
)
def test_admin_without_a_key_admits_only_a_loopback_peer_that_names_no_forwarded_client(
    server: ServerProcess, headers: dict[str, str]
) -> None:
    # A proxy on this machine connects from loopback: any forwarding header means one stands between.
    answer = httpx.get(f"{server.url}/admin/personas", headers=headers)
    if headers:
        assert_openai_error(answer, 403, "no proxy")
    else:
        assert answer.status_code == 200, answer.text


def test_a_remote_client_forging_a_loopback_forwarded_address_is_refused(server: ServerProcess) -> None:
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    remote_url = f"http://{address}:{server.port}/admin/personas"
    assert_openai_error(httpx.get(remote_url), 403)
    assert_openai_error(httpx.get(remote_url, headers={"X-Forwarded-For": "127.0.0.1"}), 403)
    assert_openai_error(httpx.get(remote_url, headers={"X-Forwarded-For": "10.0.0.9, 127.0.0.1"}), 403)


def test_metrics_with_a_metrics_key_answer_only_the_key(server: ServerProcess) -> None:
    assert_openai_error(httpx.get(f"{server.url}/metrics"), 401, "metrics key")
    wrong = {"Authorization": "Bearer nope"}
    assert_openai_error(httpx.get(f"{server.url}/metrics", headers=wrong), 401)
    keyed = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert keyed.status_code == 200 and "persona_server_requests_total" in keyed.text
    assert httpx.get(f"{server.url}/health").status_code == 200  # the rest stays open
