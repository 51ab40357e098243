"""The stream between proxies and the writer process: length-prefixed orjson frames.

A proxy sends one frame per event-loop turn: a JSON array of items, each `[0, interaction]`
(a finished Interaction as orjson writes a dataclass, for the writer to build its record) or
`[1, record]` (a record already built). The writer answers with report frames: a JSON object of
this connection's cumulative figures, `{"received": n, "backends": {name: [success, error,
dropped, waiting]}, "final": bool}`. Cumulative, so a lost or late report costs nothing; the
proxy turns them into deltas of its own counters.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from ..observe.interaction import ErrorType, Interaction, Message, Outcome
from .stores import Record

log = logging.getLogger(__name__)

HEADER = 4  # bytes of the big-endian length before each frame
MAX_FRAME = 1 << 30
INTERACTION, RECORD = 0, 1


def _default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):  # Interaction.capped
        return sorted(value)
    raise TypeError


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(HEADER, "big")


def encode(items: list[tuple[int, Interaction | Record]]) -> tuple[bytes, int]:
    """One frame's payload for `items` and how many of them it holds. An item orjson refuses is
    left out (it cannot happen with values parsed from JSON, which is all an Interaction
    holds); the caller counts the difference as dropped."""
    try:
        return orjson.dumps(items, default=_default), len(items)
    except TypeError:
        parts = []
        for item in items:
            try:
                parts.append(orjson.dumps(item, default=_default))
            except TypeError as exc:
                log.warning("analytics: a record could not be encoded: %s", exc)
        return b"[" + b",".join(parts) + b"]", len(parts)


def interaction(data: dict[str, Any]) -> Interaction:
    """The Interaction a proxy sent, rebuilt from its JSON."""
    data["messages"] = None if data["messages"] is None else [
        Message(**m) for m in data["messages"]]
    data["outcome"] = Outcome(data["outcome"])
    data["error_type"] = None if data["error_type"] is None else ErrorType(data["error_type"])
    data["capped"] = set(data["capped"])
    return Interaction(**data)


def decode(payload: bytes) -> Any:
    return orjson.loads(payload)


def encode_report(received: int, figures: dict[str, list[int]], final: bool) -> bytes:
    return orjson.dumps({"received": received, "backends": figures, "final": final})
