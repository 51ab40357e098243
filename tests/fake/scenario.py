"""The fake's vocabulary: what a model does (`Scenario`), what was asked of it
(`RequestRecord`), and the constants of Ollama's wire (content types, runner error)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SPLIT_PAUSE = 0.05  # pause between the two halves of a split line
BODY_KEEP_LIMIT = 1 << 20  # request bodies up to this size are kept in the record
RUNNER_ERROR = (
    "model runner has unexpectedly stopped, this may be due to resource limitations "
    "or an internal error, check ollama server logs for details"
)
NDJSON = "application/x-ndjson"
JSON_UTF8 = "application/json; charset=utf-8"  # gin c.JSON
JSON_PLAIN = "application/json"  # stream-path errors, OpenAI writers, waitForStream
SSE = "text/event-stream"


@dataclass
class Scenario:
    """Behaviour of one fake model.  Counts and durations (ns) land in the final chunk;
    like Go's omitempty, a zero value is left out rather than sent as 0."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    # streamed before the tokens: .thinking / message.thinking / delta.reasoning
    thinking: list[str] = field(default_factory=list)
    # native shape {"function": {"name", "arguments": {...}}}; one chunk after the tokens
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    first_delay: float = 0.0  # before any byte, status line included (load + prompt eval)
    token_delay: float = 0.0  # between chunks; also paces pull/push/create progress lines
    error_before: tuple[int, str] | None = None  # (status, message) instead of a reply
    error_after: int | None = None  # after N chunks: in-band error, stream ends unfinished
    drop_after: int | None = None  # after N chunks: abort the TCP connection
    split_lines: bool = False  # each line/event in two writes, SPLIT_PAUSE apart
    gzip: bool = False  # Content-Encoding: gzip on successful model replies
    prompt_eval_count: int = 26
    eval_count: int | None = None  # None: len(tokens)
    load_duration: int = 1_334_875
    prompt_eval_duration: int = 342_546_000
    eval_duration: int = 4_535_599_000
    total_duration: int | None = None  # None: the three durations plus a little
    embedding_dims: int = 4
    done_reason: str = "stop"

    @classmethod
    def from_json(cls, data: dict[str, Any], base: Scenario | None = None) -> Scenario:
        fields = dict(data)
        if fields.get("error_before") is not None:
            status, message = fields["error_before"]
            fields["error_before"] = (int(status), str(message))
        return dataclasses.replace(base or cls(), **fields)

    def metrics(self) -> dict[str, int]:
        """Final-chunk metrics in Go field order; zero values are omitted (omitempty)."""
        eval_count = len(self.tokens) if self.eval_count is None else self.eval_count
        total = self.total_duration
        if total is None:
            total = self.load_duration + self.prompt_eval_duration + self.eval_duration + 2_468_000
        values = {
            "total_duration": total,
            "load_duration": self.load_duration,
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": self.prompt_eval_duration,
            "eval_count": eval_count,
            "eval_duration": self.eval_duration,
        }
        return {k: v for k, v in values.items() if v}


@dataclass
class RequestRecord:
    method: str
    path_qs: str
    headers: dict[str, str]
    started: float
    body_len: int = 0
    body_sha256: str = hashlib.sha256(b"").hexdigest()
    body: bytes = b""
    finished: float | None = None
    disconnected: bool = False
    disconnected_at: float | None = None
    status: int | None = None
    aborted: bool = False  # the fake itself cut the connection (drop_after)
    # time.monotonic() when each streamed chunk had been handed to the socket
    written: list[float] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["body"]
        return data


@dataclass
class _Ctx:
    request: web.Request
    rec: RequestRecord
    param: str = ""  # the :digest / :model path segment
    body: bytes = b""
    cors_origin: str | None = None  # set when CORS headers must go on the reply


_Handler = Callable[[_Ctx], Awaitable[web.StreamResponse]]
_Frames = Callable[[], list[bytes]]  # one upstream chunk, built when it is due
