"""A real redis-server on a free loopback port, for the tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis

from testkit.server_process import free_port
from tests.api_helpers import wait_until


class RedisProcess:
    def __init__(self, directory: Path, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # never a silent skip: the README test command installs it
            raise RuntimeError("redis-server is not installed; run the README's test command")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._command = [
            *[binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", ""],
            *["--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec"],
        ]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProcess:
        self._process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        wait_until(lambda: answers(client), 10, "redis-server did not answer")
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def flush(self) -> None:
        redis.Redis(port=self.port).flushall()


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
