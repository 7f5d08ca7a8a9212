"""The texts a mapping is fitted on when a request names none: a file, chosen by a setting.

A file holds one text per line (``.txt``), or one JSON string or ``{"text": ...}`` object per line
(``.jsonl``). The package ships the demo models' everyday texts (``server/corpora/demo-neutral.txt``);
a real model pair wants texts of its own domain (``--mapping-corpus``). Every fit names its corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SHIPPED_CORPORA = Path(__file__).resolve().parent.parent / "corpora"
DEMO_CORPUS = SHIPPED_CORPORA / "demo-neutral.txt"


class CorpusError(ValueError):
    """A corpus file that cannot be read as texts."""


@dataclass(frozen=True)
class FittingCorpus:
    name: str  # what a fit's result and diagnostics call it
    texts: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> FittingCorpus:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise CorpusError(f"cannot read the fitting corpus {path}: {exc}") from exc
        lines = [line for line in lines if line.strip()]
        texts = [_jsonl_text(line, path) for line in lines] if path.suffix == ".jsonl" else lines
        if not texts:
            raise CorpusError(f"the fitting corpus {path} holds no texts")
        return cls(path.name, tuple(texts))


def _jsonl_text(line: str, path: Path) -> str:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}: a line is not JSON: {exc}") from exc
    text = value.get("text") if isinstance(value, dict) else value
    if not isinstance(text, str) or not text.strip():
        raise CorpusError(f'{path}: each line must be a JSON string or {{"text": "..."}}')
    return text
