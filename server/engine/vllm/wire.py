"""What a steered request tells vLLM's workers: a reference to vector sets they already hold.

Vectors travel to the workers once per vector set (``collective_rpc``); a request carries only the
keys of its sets, their strengths and the positions rule, in ``SamplingParams.extra_args``. Shared by
the front end and the workers, so it imports neither torch nor vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pack(array: np.ndarray) -> bytes:
    """A 1-D array as bytes: RPC arguments and results pass through msgpack, which carries bytes
    exactly (arrays arrive mangled)."""
    return np.ascontiguousarray(array).tobytes()


def unpack(data: bytes, dtype: type[np.floating]) -> np.ndarray:
    return np.frombuffer(data, dtype=dtype).copy()


# The key of our entry in SamplingParams.extra_args (other keys stay free for other extensions).
EXTRA_ARGS_KEY = "persona_server"

POSITIONS = ("all", "prompt", "response")


@dataclass(frozen=True)
class SteeringRef:
    """A request's steering as the workers apply it: sum of ``strength * set`` over its terms."""

    terms: tuple[tuple[str, float], ...]  # (vector-set key, strength)
    positions: str = "all"
    # The set of the request's edits (ablate, cap), one per block: block -> unit vector followed by
    # alpha, low, high (``edit_set``); None: no edit.
    edit: str | None = None

    def to_extra_args(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "terms": [[key, strength] for key, strength in self.terms],
            "positions": self.positions,
        }
        if self.edit is not None:
            entry["edit"] = self.edit
        return {EXTRA_ARGS_KEY: entry}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, object] | None) -> SteeringRef | None:
        """The reference a request carries, or None when it steers nothing."""
        entry = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if not isinstance(entry, dict) or not (entry.get("terms") or entry.get("edit")):
            return None
        terms = tuple((str(key), float(strength)) for key, strength in entry.get("terms") or ())
        positions = str(entry.get("positions", "all"))
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions rule {positions!r}")
        edit = entry.get("edit")
        return cls(terms=terms, positions=positions, edit=None if edit is None else str(edit))


def slot_key(ref: SteeringRef) -> tuple[tuple[object, ...], float]:
    """The slot a plan's vectors take in the workers' tables and the scale its tokens read them at:
    one persona at any strength shares that persona's slot (unit vectors, the strength as the
    scale); a composition takes a slot of its own, summed at its strengths."""
    if len(ref.terms) == 1:
        key, strength = ref.terms[0]
        return ("set", key), strength
    return ("plan", ref.terms), 1.0


CAPTURE_KEY = "persona_server_capture"


@dataclass(frozen=True)
class CaptureSpec:
    """A read-back request: sum the outputs of blocks ``0..num_blocks-1`` over positions >= ``start``,
    and keep the last prompt token's outputs; the worker holds them under ``token`` until taken.
    ``in_flight``: a generating request's answer, whose sums the front end cuts at the answer's end."""

    token: str
    start: int
    num_blocks: int
    in_flight: bool = False

    def to_extra_args(self) -> dict[str, object]:
        entry = {
            "token": self.token,
            "start": self.start,
            "blocks": self.num_blocks,
            "in_flight": self.in_flight,
        }
        return {CAPTURE_KEY: entry}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, object] | None) -> CaptureSpec | None:
        entry = (extra_args or {}).get(CAPTURE_KEY)
        if not isinstance(entry, dict):
            return None
        return cls(
            token=str(entry["token"]),
            start=int(entry["start"]),
            num_blocks=int(entry["blocks"]),
            in_flight=bool(entry.get("in_flight", False)),
        )
