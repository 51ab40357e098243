"""The Interaction record: one request through the proxy, as everything downstream sees it.

The proxy fills one Interaction while the exchange is in flight and hands it, finished, to its
observers (metrics now; analytics stores later). Observers read it and never see aiohttp objects.
Times are `time.time()` epoch seconds for start/end and `time.perf_counter()` seconds for the
in-flight marks, so durations are immune to wall-clock jumps.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar


class Outcome(str, Enum):
    """How an exchange ended, as stored and shown. The metric's `status` label is the same word,
    with upstream_error folded into error."""

    SUCCESS = "success"
    ERROR = "error"  # Ollama answered with an error (HTTP status or in-band error line)
    UPSTREAM_ERROR = "upstream_error"  # unreachable, reset, timed out or truncated
    CANCELLED = "cancelled"  # the client went away first


class ErrorType(str, Enum):
    """The bounded `error_type` label of `ollama_errors_total`."""

    CONNECT = "connect"
    RESET = "reset"
    TIMEOUT = "timeout"
    STREAM_ERROR = "stream_error"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"


# Caps on text a client or the upstream controls, in characters. A model name is short
# ("namespace/name:tag"); an error is a sentence, but Ollama's 404 echoes the requested name,
# so a 20 MB name would otherwise be kept twice: in the live list, the label path and the store.
CAPS = {"model": 256, "error": 1024}

T = TypeVar("T")

_counter = itertools.count()
_PID = os.getpid() & 0xFFFF


def new_id() -> str:
    """A time-ordered, unique-enough id: 12 hex digits of ms since epoch + pid + counter."""
    return f"{int(time.time() * 1000):012x}{_PID:04x}{next(_counter) & 0xFFFFFF:06x}"


def ends(items: list[T], keep: int) -> tuple[list[T], int]:
    """The first and last halves of `keep` of `items` (the start, a system prompt and the task,
    and the end, the question, matter most), and how many were left out between them."""
    left_out = len(items) - keep
    if left_out <= 0:
        return items, 0
    head = keep // 2
    return [*items[:head], *items[head + left_out:]], left_out


@dataclass(slots=True)
class Message:
    """One message of a chat request (or of /v1/responses' `input`), as ollama.request reads it.

    Values are the client's own objects, referenced rather than copied or decoded: analytics
    bounds, redacts and hashes them later, off the request path.
    """

    role: Any  # a string in any well-formed request; whatever was sent otherwise
    text: str  # the content: a string, or the text of its parts joined by "\n"
    images: list[Any] | None = None  # as sent: base64, a data: URL, an http(s) URL (or junk)
    thinking: Any = None
    tool_calls: Any = None
    tool_name: Any = None
    tool_call_id: Any = None
    name: Any = None


@dataclass(slots=True)
class Interaction:
    # What was asked.
    method: str
    path: str
    endpoint: str
    started_at: float  # epoch seconds
    started: float  # perf_counter seconds
    id: str = field(default_factory=new_id)
    client_ip: str | None = None
    user_agent: str | None = None
    # The client's W3C trace context headers, as sent (OpenTelemetry export parents its span).
    traceparent: str | None = None
    tracestate: str | None = None
    model: str | None = None
    stream: bool = False
    options: dict[str, Any] | None = None
    # OpenAI-style generation parameters at the top of the body (temperature, max_tokens, stop…)
    params: dict[str, Any] | None = None
    prompt: str | None = None  # the text the prompt category is judged from
    system: str | None = None
    request_bytes: int = 0
    # The request's messages and /api/generate's images, read once by ollama.request; kept only
    # until analytics has taken what it stores from them (they hold the client's texts and
    # images by reference).
    messages: list[Message] | None = None
    images: list[Any] | None = None
    # Middle messages left out before the observers saw `messages` (a body parsed in another
    # process sends back only what a record can keep: ollama.request.read_request_apart).
    messages_elided: int = 0
    # Its images that are not URLs are already {"bytes", "sha256"} (ollama.request.image_digest),
    # made where the body was parsed apart: the base64 never came back.
    images_digested: bool = False

    # What came back.
    http_status: int | None = None
    response_model: str | None = None  # the model the reply names
    response_id: str | None = None  # the reply's own id (OpenAI-style routes; native: none)
    response_bytes: int = 0
    first_token: float | None = None  # perf_counter at the first content chunk
    last_token: float | None = None  # perf_counter at the last content chunk
    # Reply and thinking text as it streamed, kept up to ollama.TEXT_KEPT characters in all.
    response_pieces: list[str] = field(default_factory=list)
    thinking_pieces: list[str] = field(default_factory=list)
    chunks: int = 0  # chunks that carried text, kept or not
    tool_calls: list[Any] = field(default_factory=list)
    done: bool = False  # the stream ended as Ollama ends a complete one
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    # eval_count was counted by the proxy, one token per chunk, as the reply carried no count
    # (an OpenAI-compatible stream without stream_options.include_usage): an estimate.
    tokens_estimated: bool = False
    total_duration_ns: int | None = None
    load_duration_ns: int | None = None
    prompt_eval_duration_ns: int | None = None
    eval_duration_ns: int | None = None
    embedding_dims: int | None = None

    # How it ended.
    ended_at: float | None = None
    ended: float | None = None
    outcome: Outcome = Outcome.SUCCESS
    error_type: ErrorType | None = None
    error: str | None = None
    prompt_category: str = "other"
    # Fields cut to their cap in CAPS ("model", "error"), and "request_json" when the request
    # body was forwarded without being read (larger than max_parse_bytes, or over the budget
    # of bodies parsed at once): what the record marks as truncated.
    capped: set[str] = field(default_factory=set)

    def clip(self, name: str, text: str) -> str:
        """`text` cut to the cap of field `name` (a key of CAPS), the cut noted in `capped`."""
        limit = CAPS[name]
        if len(text) <= limit:
            return text
        self.capped.add(name)
        return text[:limit]

    def apply_caps(self) -> None:
        """Cut every capped field that was set directly, for the observers' sake."""
        if self.model is not None:
            self.model = self.clip("model", self.model)
        if self.error is not None:
            self.error = self.clip("error", self.error)

    @property
    def duration(self) -> float:
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started

    @property
    def ttft(self) -> float | None:
        """Wall-clock time to first token at the proxy; only meaningful for streamed replies."""
        return None if self.first_token is None else self.first_token - self.started

    @property
    def response_text(self) -> str:
        return "".join(self.response_pieces)

    @property
    def tokens_per_second(self) -> float | None:
        if self.eval_count and self.eval_duration_ns:
            return self.eval_count / self.eval_duration_ns * 1e9
        return None

    @property
    def prompt_tokens_per_second(self) -> float | None:
        if self.prompt_eval_count and self.prompt_eval_duration_ns:
            return self.prompt_eval_count / self.prompt_eval_duration_ns * 1e9
        return None

    @property
    def time_per_output_token(self) -> float | None:
        """Seconds per generated token after the first.

        Streamed: wall clock at the proxy, (last token - first token) / (tokens - 1), the
        serving-engine definition. Not streamed: the proxy sees no token timing, so Ollama's
        own eval_duration / eval_count.
        """
        n = self.eval_count
        if not n:
            return None
        if self.stream and self.first_token is not None and self.last_token is not None:
            if n < 2:
                return None
            return (self.last_token - self.first_token) / (n - 1)
        if self.eval_duration_ns:
            return self.eval_duration_ns / n / 1e9
        return None
