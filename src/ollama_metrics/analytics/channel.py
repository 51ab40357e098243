"""The stream between proxies and the writer process: length-prefixed orjson frames.

A proxy sends frames of a few milliseconds' records: a JSON array of items, each
`[0, interaction, elided]` (a finished Interaction as orjson writes a dataclass, for the writer
to build its record, after `trim`; `elided` messages were left out of its middle) or
`[1, record]` (a record already built). The writer answers with report frames: a JSON object of
this connection's cumulative figures, `{"received": n, "backends": {name: [success, error,
dropped, waiting]}, "final": bool}`. Cumulative, so a lost or late report costs nothing; the
proxy turns them into deltas of its own counters.

The stream is a Unix socket in a private directory where Python has them. Where it has none
(Windows) it is TCP on the loopback interface, which any local process can reach, or listen on
once the writer has left its port: there both ends prove they hold the writer's secret
(`SECRET_BYTES` random bytes its owner made) before anything else is sent, and the secret itself
never crosses the socket. The writer sends a challenge (`CHALLENGE_BYTES` random bytes); the
proxy answers with a challenge of its own and its `proof` of both; the writer checks it (else it
closes the connection, having read nothing else) and answers with its own `proof`; the proxy
checks that (else it closes the connection, having sent no record: a process that listens on a
restarted writer's old port gets neither the secret nor any record). Each proof is an HMAC-
SHA256 keyed with the secret over its role and both challenges, so neither side's proof can be
replayed or reflected as the other's. The frames after it are neither authenticated nor
encrypted: a local process that listens on the old port and relays each connection to the real
writer could read and add records, as on any loopback TCP between local processes (on Windows a
named pipe with an ACL would close that; not done). An `Address` names either, as one string a
process hands another (it carries the secret: pass it over a private channel, never on a command
line).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from ..observe.interaction import ErrorType, Interaction, Message, Outcome, ends

log = logging.getLogger(__name__)

HEADER = 4  # bytes of the big-endian length before each frame
MAX_FRAME = 1 << 30
INTERACTION, RECORD = 0, 1
LOOPBACK = "127.0.0.1"
SECRET_BYTES = 32
_TCP = "tcp://"


@dataclass(frozen=True)
class Address:
    """Where the writer listens: a Unix socket's `path`, or `port` on LOOPBACK with the
    `secret` its first frame must be."""

    path: str = ""
    port: int = 0
    secret: bytes = b""

    def __str__(self) -> str:
        return f"{_TCP}{LOOPBACK}:{self.port}#{self.secret.hex()}" if self.port else self.path

    @classmethod
    def parse(cls, text: str) -> Address:
        if not text.startswith(_TCP):
            return cls(path=text)
        where, _, secret = text[len(_TCP):].partition("#")
        host, _, port = where.rpartition(":")
        try:
            key = bytes.fromhex(secret)
        except ValueError:
            key = b""
        if host != LOOPBACK or not port.isdigit() or len(key) != SECRET_BYTES:
            raise ValueError(f"not a writer's address: {host}:{port}")
        return cls(port=int(port), secret=key)


CHALLENGE_BYTES = 32
PROXY_ROLE, WRITER_ROLE = b"proxy", b"writer"


def proof(secret: bytes, role: bytes, challenge: bytes, answer: bytes) -> bytes:
    """What the side with `role` sends to show it holds `secret`: the writer's `challenge` and the
    proxy's `answer` challenge, in that order for both roles."""
    return hmac.new(secret, role + challenge + answer, hashlib.sha256).digest()


def proven(secret: bytes, role: bytes, challenge: bytes, answer: bytes, given: bytes) -> bool:
    return hmac.compare_digest(proof(secret, role, challenge, answer), given)


def _default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):  # Interaction.capped
        return sorted(value)
    raise TypeError


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(HEADER, "big")


def encode(items: list[tuple[Any, ...]]) -> tuple[bytes, int]:
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


def trim(i: Interaction, max_messages: int, chars: int) -> int:
    """Leave out of `i` what its record cannot keep, so it is not encoded and sent for nothing:
    the middle messages past `max_messages` (returns how many; record.build keeps the first
    and last halves) and every text past `chars` (Privacy.decisive_chars)."""
    elided = 0
    messages = i.messages
    if messages is not None:
        messages, elided = ends(messages, max_messages)
        i.messages = messages
        for m in messages:
            if len(m.text) > chars:
                m.text = m.text[:chars]
            if isinstance(m.thinking, str) and len(m.thinking) > chars:
                m.thinking = m.thinking[:chars]
    if i.prompt is not None and len(i.prompt) > chars:
        i.prompt = i.prompt[:chars]
    if i.system is not None and len(i.system) > chars:
        i.system = i.system[:chars]
    return elided


_LEFT_OUT = Message(role=None, text="")  # stands for each message `trim` left out


def interaction(data: dict[str, Any], elided: int = 0) -> Interaction:
    """The Interaction a proxy sent, rebuilt from its JSON."""
    if data["messages"] is not None:
        messages = [Message(**m) for m in data["messages"]]
        if elided:
            head = len(messages) // 2  # trim kept max_messages: its first and last halves
            messages[head:head] = [_LEFT_OUT] * elided
        data["messages"] = messages
    data["outcome"] = Outcome(data["outcome"])
    data["error_type"] = None if data["error_type"] is None else ErrorType(data["error_type"])
    data["capped"] = set(data["capped"])
    return Interaction(**data)


def decode(payload: bytes) -> Any:
    return orjson.loads(payload)


def encode_report(received: int, figures: dict[str, list[int]], final: bool) -> bytes:
    return orjson.dumps({"received": received, "backends": figures, "final": final})
