#!/usr/bin/env bash
# The vLLM engine on a CUDA machine, in one run of under 10 minutes: install vLLM for CUDA, run the
# vLLM engine tests on the GPU (compiled, CUDA graphs on: vLLM's defaults), then the benchmark of
# loadtests/vllm_bench.py on a larger random-weight Llama (hidden 2048, 16 blocks, bfloat16) against
# plain vLLM with CUDA graphs, writing everything under ${OUT:-gpu-check}/.
#
# It needs the package registry for vLLM, or VLLM_WHEELS=DIR: a folder of wheels (vllm and what it
# needs, for this Python) installed offline. Without a GPU (no nvidia-smi, or GPU_CHECK_CPU=1) it
# falls back to this machine's CPU build, installed as the README says: the same tests and a short
# benchmark on the reference model. GPU_CHECK_DRY_RUN=1 prints the commands without running them
# (tests/test_gpu_check.py checks both plans).
#
#     bash loadtests/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"

run() {
    echo "+ $*"
    if [[ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]]; then
        "$@"
    fi
}

if [[ "${GPU_CHECK_CPU:-0}" != 1 ]] && command -v nvidia-smi >/dev/null 2>&1; then
    device=cuda
    # CUDA vLLM brings its own CUDA torch; the project's other dependencies come with -e.
    wheels=()
    if [[ -n "${VLLM_WHEELS:-}" ]]; then
        wheels=(--no-index --find-links "$VLLM_WHEELS")
    fi
    run python3 -m venv .venv-gpu
    run .venv-gpu/bin/pip install -q "${wheels[@]}" vllm
    run .venv-gpu/bin/pip install -q "${wheels[@]}" -e '.[dev]'
    python_bin=.venv-gpu/bin/python
    tests=(tests/test_vllm_engine.py tests/test_vllm_in_graph.py)
    bench_args=(--hidden 2048 --blocks 16 --dtype bfloat16 --rounds 1 --requests 32 --max-tokens 128)
else
    device=cpu
    python_bin=${PYTHON:-python}
    # One compiled engine: the CPU's compile and start-up take most of the time.
    tests=(tests/test_vllm_engine.py -k "llama and not eager" tests/test_vllm_in_graph.py)
    bench_args=(--rounds 1 --requests 8 --max-tokens 32)
fi

echo "device: $device" | tee "$out/device.txt"
if [[ "$device" == cuda ]]; then
    run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/device.txt"
fi
run timeout 300 "$python_bin" -m pytest -q -x "${tests[@]}" --junitxml "$out/tests.xml" \
    2>&1 | tail -n 40 | tee "$out/tests.txt"
run timeout 240 "$python_bin" -m loadtests.vllm_bench "${bench_args[@]}" --json "$out/bench.json" \
    2>&1 | tail -n 60 | tee "$out/bench.txt"
