"""/metrics on a port of its own (--metrics-port), e.g. one that only Prometheus can reach.

A small threaded WSGI server beside uvicorn, as prometheus_client's start_http_server runs one,
plus the --metrics-key check: the same answer as /metrics on the API port, without opening the API.
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

_StartResponse = Callable[..., Any]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung scrape never holds the process open


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds would drown the server's log


def _keyed(app: Callable[..., Iterable[bytes]], key: str | None) -> Callable[..., Iterable[bytes]]:
    def guarded(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") != "/metrics":
            return _error(start_response, "404 Not Found", "this port serves /metrics only", "not_found")
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if key and not (
            scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
        ):
            message = "a valid metrics key is required (Authorization: Bearer <metrics key>)"
            return _error(start_response, "401 Unauthorized", message, "invalid_metrics_key")
        return app(environ, start_response)

    return guarded


def _error(start_response: _StartResponse, status: str, message: str, code: str) -> list[bytes]:
    error_type = "authentication_error" if status.startswith("401") else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}})
    start_response(status, [("Content-Type", "application/json")])
    return [body.encode()]


class MetricsServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, key: str | None) -> None:
        server_class = type("_Server", (_ThreadingServer,), {})
        server_class.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        app = _keyed(make_wsgi_app(registry), key)
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-port", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
