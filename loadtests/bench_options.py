"""The command-line options every interleaved benchmark shares."""

from __future__ import annotations

import argparse
from pathlib import Path


def bench_parser(doc: str | None, rounds: int, requests: int) -> argparse.ArgumentParser:
    """A parser with --rounds, --requests, --max-tokens and --json, for a benchmark to add its own to."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--requests", type=int, default=requests, help="requests per condition and round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    return parser
