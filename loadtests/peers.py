"""The peer servers of the benchmarks, started on this machine as PEERS.md says they run best."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loadtests.engine_bench import QUESTIONS
from testkit.server_process import free_port


class PeerProcess:
    """A server subprocess on a free loopback port, ready once ``ready_path`` answers 200."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, log: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._argv = argv
        self._ready_path = ready_path
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PeerProcess:
        self._process = subprocess.Popen(self._argv, stdout=self._log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self._log}")
            try:
                if httpx.get(f"{self.url}{self._ready_path}", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not ready; see {self._log}")

    def __exit__(self, *_: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def llama_cpp_server(gguf: Path, alias: str, log: Path) -> PeerProcess:
    """`python -m llama_cpp.server` as PEERS.md starts it, plus ``--interrupt_requests False``.

    By default a new request cuts off the stream being served, which would count tokens never generated.
    """
    port = free_port()
    argv = [
        *[sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--chat_format", "chatml"],
        *["--n_ctx", "2048", "--port", str(port), "--model_alias", alias, "--interrupt_requests", "False"],
    ]
    return PeerProcess("llama_cpp.server", argv, port, "/v1/models", log)


def transformers_server(model_dir: Path, log: Path, cli: Path | None = None) -> PeerProcess:
    """`transformers serve PATH --continuous-batching --device cpu --dtype float32` (PEERS.md's best),
    from this environment or from ``cli`` (another environment's `transformers` script)."""
    port = free_port()
    cli = cli or Path(sys.executable).with_name("transformers")
    argv = [
        *[str(cli), "serve", str(model_dir), "--continuous-batching", "--device", "cpu"],
        *["--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)],
    ]
    return PeerProcess("transformers serve", argv, port, "/health", log)


# vLLM's CPU build on every core of a small machine (by default it leaves one to the front end) with
# a KV cache of 2 GiB: the same for persona-server's vLLM engine and for plain vLLM.
VLLM_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",
}


def vllm_server(
    model_dir: Path, name: str, log: Path, eager: bool = False, dtype: str = "float32"
) -> PeerProcess:
    """vLLM's own OpenAI server as PEERS.md starts it (the `vllm` script fails on vllm-cpu's name):
    compiled (vLLM's default; on CUDA with its default CUDA graphs) or with ``--enforce-eager``."""
    port = free_port()
    argv = [
        *[sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)],
        *["--served-model-name", name, "--dtype", dtype, "--max-model-len", "2048", "--host", "127.0.0.1"],
        *["--port", str(port), *(["--enforce-eager"] if eager else [])],
    ]
    os.environ.update(VLLM_ENV)  # inherited by the peer's processes
    return PeerProcess("vllm" + (" eager" if eager else ""), argv, port, "/v1/models", log)


def check_llama_cpp_runs_to_max_tokens(url: str, model: str, max_tokens: int) -> None:
    """llama_cpp.server's usage over-reports, so its requests count max_tokens: check that they reach it."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "min_tokens": max_tokens,
    }
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()
    if answer["choices"][0]["finish_reason"] != "length":
        raise RuntimeError(f"llama_cpp.server stopped early despite min_tokens: {answer}")
