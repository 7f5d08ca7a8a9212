"""Helpers that the tests and the benchmarks share: tiny models, a real server process, persona uploads.

The product never imports this package; ``tests/`` and ``loadtests/`` both import it, and never each
other, so that a benchmark runs without the test suite and a test never depends on a benchmark.
"""
