"""A real persona-server process on a free loopback port, like vLLM's RemoteOpenAIServer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 120,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = [sys.executable, "-m", "server", "serve", "--port", str(self.port), *args]
        self._env = {**os.environ, **(env or {})}
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._ready_timeout = ready_timeout

    def __enter__(self) -> ServerProcess:
        log = open(self._log_path, "wb") if self._log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(self._args, env=self._env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout=self._ready_timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"server exited with {self._process.returncode}; see {self._log_path}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s; see {self._log_path}")

    @property
    def pid(self) -> int:
        """The server's process id (tests read its memory from /proc)."""
        assert self._process is not None
        return self._process.pid

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path else ""

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes and docker stop a container; the process is left to finish."""
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        assert self._process is not None
        return self._process.wait(timeout=timeout)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
