"""The one compiled part of persona-server: the llama.cpp per-row lane's evaluation callback.

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler the
install still succeeds, and only a GGUF model's per-row lane (mixed personas, monitoring, closed
loops, extraction) says, when the model loads, that it needs the callback.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "server.engine.llamacpp._row_callback",
            sources=["server/engine/llamacpp/_row_callback.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
