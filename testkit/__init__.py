"""Helpers that the tests and the benchmarks share: tiny models, a real server process, persona uploads.

A top-level package of the repository that is not installed (pyproject's packages.find takes
``server*`` and ``persona_store*`` only): ``python -m pytest`` and ``python -m loadtests.NAME`` run from
the repository root find it there. The product never imports it; ``tests/`` and ``loadtests/`` both
import it, and never each other, so that a benchmark runs without the test suite and a test never
depends on a benchmark.
"""
