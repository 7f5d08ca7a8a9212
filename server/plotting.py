"""Figures drawn one at a time.

matplotlib's pyplot and its mathtext parser keep process-wide state and are not thread-safe: six
bakes drawing their loss curves at once on worker threads failed with pyparsing errors ("Unknown
symbol: \\mathdefault"). Every function that draws, from making its figure to closing it, is
decorated with ``drawn_alone``, and returns its figure's PNG with ``png_bytes``.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
_PYPLOT_LOCK = threading.Lock()


def drawn_alone(draw: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(draw)
    def locked(*args: P.args, **kwargs: P.kwargs) -> T:
        with _PYPLOT_LOCK:
            return draw(*args, **kwargs)

    return locked


def png_bytes(figure: Any) -> bytes:
    """The figure laid out and rendered as a PNG, then closed."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
