"""loadtests/gpu_check.sh, the vLLM engine's check on a CUDA machine: its syntax, and the plan it runs
with a GPU and in its CPU fallback (GPU_CHECK_DRY_RUN prints the commands without running them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "loadtests" / "gpu_check.sh"


def plan(tmp_path: Path, with_gpu: bool) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    if with_gpu:
        fake.write_text("#!/bin/sh\necho fake\n")
        fake.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    env = {
        **os.environ,
        "PATH": path,
        "GPU_CHECK_DRY_RUN": "1",
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
    }
    if not with_gpu:
        env["GPU_CHECK_CPU"] = "1"
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=True)
    return done.stdout


def test_the_gpu_check_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_with_a_gpu_it_installs_cuda_vllm_and_benchmarks_the_larger_model(tmp_path: Path) -> None:
    out = plan(tmp_path, with_gpu=True)
    assert "device: cuda" in out
    assert "pip install -q vllm" in out
    assert "tests/test_vllm_engine.py tests/test_vllm_in_graph.py" in out
    assert "loadtests.vllm_bench --hidden 2048 --blocks 16 --dtype bfloat16" in out


def test_without_a_gpu_it_falls_back_to_the_cpu_build(tmp_path: Path) -> None:
    out = plan(tmp_path, with_gpu=False)
    assert "device: cpu" in out and "pip install" not in out
    assert f"{sys.executable} -m pytest" in out and "llama and not eager" in out
    assert f"{sys.executable} -m loadtests.vllm_bench --rounds 1" in out


@pytest.mark.slow  # imports the benchmark: about 5 s
def test_the_benchmark_it_runs_takes_its_arguments() -> None:
    """The benchmark parses the GPU plan's arguments (``--help`` imports it and exits)."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.vllm_bench", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--hidden", "--blocks", "--dtype", "--rounds", "--requests", "--max-tokens", "--json"):
        assert flag in done.stdout
