"""Ollama API knowledge: route templates and what a reply says (ollama.request reads requests).

Pure code, no I/O: the proxy forwards bytes untouched and feeds copies of them here. Every parser
is total: bad JSON, binary data or a line split across chunks never raises; it only means less is
learned about the exchange. The wire reference is shared/reference/ollama-api.md.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import orjson

from ..observe.interaction import CAPS, Interaction


class Kind(Enum):
    """What a route carries, which decides how its request and reply are read."""

    GENERATE = "generate"  # /api/generate, /api/chat: NDJSON stream by default, final done:true
    EMBED = "embed"  # /api/embed, /api/embeddings
    PROGRESS = "progress"  # /api/pull, /api/push, /api/create: NDJSON progress by default
    MODEL_JSON = "model_json"  # small JSON requests naming a model (/api/show, /api/delete, ...)
    OPENAI = "openai"  # /v1/chat/completions, /v1/completions: SSE when stream:true, [DONE]
    OPENAI_EMBED = "openai_embed"  # /v1/embeddings
    OPENAI_EVENTS = "openai_events"  # /v1/responses, /v1/messages: SSE with event: lines
    OTHER = "other"  # bodies passed through unread (blobs, unknown routes)

    @property
    def reads_request(self) -> bool:
        return self is not Kind.OTHER

    @property
    def streams_by_default(self) -> bool:
        # Native routes stream unless "stream": false; OpenAI-compatible ones only on true.
        return self in (Kind.GENERATE, Kind.PROGRESS)


_EXACT: dict[str, tuple[str, Kind]] = {
    p: (p, k)
    for p, k in [
        ("/", Kind.OTHER),
        ("/api/version", Kind.OTHER),
        ("/api/status", Kind.OTHER),
        ("/api/tags", Kind.OTHER),
        ("/api/ps", Kind.OTHER),
        ("/api/me", Kind.OTHER),
        ("/api/signout", Kind.OTHER),
        ("/api/experimental/web_search", Kind.OTHER),
        ("/api/experimental/web_fetch", Kind.OTHER),
        ("/api/experimental/model-recommendations", Kind.OTHER),
        ("/api/generate", Kind.GENERATE),
        ("/api/chat", Kind.GENERATE),
        ("/api/embed", Kind.EMBED),
        ("/api/embeddings", Kind.EMBED),
        ("/api/pull", Kind.PROGRESS),
        ("/api/push", Kind.PROGRESS),
        ("/api/create", Kind.PROGRESS),
        ("/api/show", Kind.MODEL_JSON),
        ("/api/delete", Kind.MODEL_JSON),
        ("/api/copy", Kind.MODEL_JSON),
        ("/v1/chat/completions", Kind.OPENAI),
        ("/v1/completions", Kind.OPENAI),
        ("/v1/embeddings", Kind.OPENAI_EMBED),
        ("/v1/models", Kind.OTHER),
        ("/v1/responses", Kind.OPENAI_EVENTS),
        ("/v1/messages", Kind.OPENAI_EVENTS),
        ("/v1/audio/transcriptions", Kind.OTHER),
    ]
}
_PREFIXED: list[tuple[str, str]] = [
    ("/api/blobs/", "/api/blobs/:digest"),
    ("/v1/models/", "/v1/models/:model"),
    ("/api/user/keys/", "/api/user/keys/:encodedKey"),
]


def route(path: str) -> tuple[str, Kind]:
    """The route template (a bounded label value, `other` when unknown) and its kind."""
    hit = _EXACT.get(path)
    if hit is not None:
        return hit
    for prefix, template in _PREFIXED:
        if path.startswith(prefix) and len(path) > len(prefix) and "/" not in path[len(prefix) :]:
            return template, Kind.OTHER
    return "other", Kind.OTHER


# --- replies --------------------------------------------------------------------------------


class ReplyReader:
    """Reads copies of a reply's bytes as they are forwarded and fills the Interaction.

    Chosen by the reply's Content-Type, not the route: Ollama answers a streamed request with a
    single JSON object when it fails before the first token or only loads a model.
    """

    streamed = True  # tokens arrive one chunk at a time, so their arrival times mean something

    def __init__(self, interaction: Interaction) -> None:
        self.i = interaction
        self._kept = 0  # characters of text kept so far

    def feed(self, chunk: bytes, now: float) -> None:
        """Take one forwarded chunk that arrived at perf_counter time `now`."""

    def close(self) -> None:
        """The reply ended (cleanly or not); settle what is known."""

    # Shared by every format: one decoded JSON object of Ollama's or OpenAI's.
    def _native(self, obj: dict[str, Any], now: float) -> None:
        i = self.i
        error = obj.get("error")
        if error is not None:
            i.error = i.clip("error", error if isinstance(error, str) else _error_message(error))
            return
        message = obj.get("message")
        if isinstance(message, dict):
            self._token(message.get("content"), message.get("thinking"), now)
            calls = message.get("tool_calls")
        else:
            self._token(obj.get("response"), obj.get("thinking"), now)
            calls = obj.get("tool_calls")
        if calls:
            self._calls(calls, now)
        if obj.get("done") is True:
            i.done = True
            i.response_model = _model(obj.get("model"), i)
            reason = obj.get("done_reason")
            i.done_reason = reason if isinstance(reason, str) else None
            i.prompt_eval_count = _int(obj.get("prompt_eval_count"), i.prompt_eval_count)
            i.eval_count = _int(obj.get("eval_count"), i.eval_count)
            i.total_duration_ns = _int(obj.get("total_duration"), i.total_duration_ns)
            i.load_duration_ns = _int(obj.get("load_duration"), i.load_duration_ns)
            i.prompt_eval_duration_ns = _int(
                obj.get("prompt_eval_duration"), i.prompt_eval_duration_ns
            )
            i.eval_duration_ns = _int(obj.get("eval_duration"), i.eval_duration_ns)
        elif "embeddings" in obj or "embedding" in obj:  # /api/embed(dings): no done flag
            i.done = True
            i.response_model = _model(obj.get("model"), i)
            vectors = obj.get("embeddings") or [obj.get("embedding")]
            if isinstance(vectors, list) and vectors and isinstance(vectors[0], list):
                i.embedding_dims = len(vectors[0])
            i.prompt_eval_count = _int(obj.get("prompt_eval_count"), None)
            i.total_duration_ns = _int(obj.get("total_duration"), None)
            i.load_duration_ns = _int(obj.get("load_duration"), None)

    def _openai(self, obj: dict[str, Any], now: float) -> None:
        i = self.i
        error = obj.get("error")
        if error is not None:
            i.error = i.clip("error", _error_message(error))
            return
        if "model" in obj:
            i.response_model = _model(obj.get("model"), i)
        _response_id(obj, i)
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta", choice.get("message"))
                if isinstance(delta, dict):
                    self._token(delta.get("content"), delta.get("reasoning"), now)
                    if delta.get("tool_calls"):
                        self._calls(delta["tool_calls"], now)
                else:
                    self._token(choice.get("text"), None, now)
                reason = choice.get("finish_reason")
                if isinstance(reason, str):
                    i.done_reason = reason
        data = obj.get("data")  # /v1/embeddings
        if isinstance(data, list) and data and isinstance(data[0], dict):
            vector = data[0].get("embedding")
            if isinstance(vector, list):
                i.embedding_dims = len(vector)
        usage = obj.get("usage")
        # /v1/completions with include_usage puts zeros on every chunk; the real one comes last.
        if isinstance(usage, dict) and any(usage.get(k) for k in ("prompt_tokens",
                                                                  "completion_tokens")):
            i.prompt_eval_count = _int(usage.get("prompt_tokens"), i.prompt_eval_count)
            i.eval_count = _int(usage.get("completion_tokens"), i.eval_count)

    def _token(self, content: Any, thinking: Any, now: float) -> None:
        got = False
        if isinstance(content, str) and content:
            self._keep(self.i.response_pieces, content)
            got = True
        if isinstance(thinking, str) and thinking:
            self._keep(self.i.thinking_pieces, thinking)
            got = True
        if got:
            self.i.chunks += 1
            self._mark(now)

    def _count_chunks(self) -> None:
        """A streamed reply that ended with no token count (an OpenAI-compatible stream without
        include_usage, or one cut short) is counted by its chunks: Ollama streams one token
        per chunk of content or thinking. Marked as the proxy's estimate; a count the reply
        carries always wins, as it is read before this."""
        i = self.i
        if i.eval_count is None and i.chunks:
            i.eval_count = i.chunks
            i.tokens_estimated = True

    def _keep(self, pieces: list[str], text: str) -> None:
        room = TEXT_KEPT - self._kept
        if room > 0:
            pieces.append(text[:room])
            self._kept += min(len(text), room)

    def _calls(self, calls: Any, now: float) -> None:
        if isinstance(calls, list):
            self.i.tool_calls.extend(calls)
            self._mark(now)

    def _mark(self, now: float) -> None:
        if not self.streamed:
            return
        if self.i.first_token is None:
            self.i.first_token = now
        self.i.last_token = now


class _LineReader(ReplyReader):
    """Splits the byte stream into lines, carrying a partial line over to the next chunk."""

    def __init__(self, interaction: Interaction) -> None:
        super().__init__(interaction)
        self._carry = b""

    def feed(self, chunk: bytes, now: float) -> None:
        data = self._carry + chunk if self._carry else chunk
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            self.line(data[start:end], now)
            start = end + 1
        self._carry = data[start:]
        if len(self._carry) > MAX_LINE:  # no sane line is this long; stop buffering it
            self._carry = b""

    def close(self) -> None:
        if self._carry:
            self.line(self._carry, self.i.last_token or 0.0)
            self._carry = b""
        self._count_chunks()

    def line(self, line: bytes, now: float) -> None:
        raise NotImplementedError


MAX_LINE = 16 * 1024 * 1024  # Ollama's own client accepts lines up to 8 MB
# Reply text kept for the record, at most. What is stored is cut shorter (--analytics-max-text,
# 64 Ki characters by default); past this a reply is read for its counts but its text is let go,
# so a runaway stream (or a 200 MB one) never piles up in memory.
TEXT_KEPT = 1 << 20


class NdjsonReader(_LineReader):
    def line(self, line: bytes, now: float) -> None:
        obj = _loads(line)
        if obj is not None:
            self._native(obj, now)


class SseReader(_LineReader):
    """`data:` lines of text/event-stream; `[DONE]` ends an OpenAI chat/completions stream."""

    def line(self, line: bytes, now: float) -> None:
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.i.done = True
                return
            obj = _loads(payload)
            if obj is None:
                return
            event = obj.get("type")
            if isinstance(event, str):  # /v1/responses and /v1/messages name their events
                self._event(event, obj, now)
            else:
                self._openai(obj, now)

    def _event(self, event: str, obj: dict[str, Any], now: float) -> None:
        i = self.i
        if event in ("response.output_text.delta", "response.reasoning_summary_text.delta"):
            delta = obj.get("delta")
            if event == "response.output_text.delta":
                self._token(delta, None, now)
            else:
                self._token(None, delta, now)
        elif event == "content_block_delta":  # Anthropic
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self._token(delta.get("text"), delta.get("thinking"), now)
        elif event in ("response.created", "message_start"):
            _response_id(obj.get("response") or obj.get("message"), i)
        elif event in ("response.completed", "message_stop"):
            i.done = True
            response = obj.get("response")
            usage = response.get("usage") if isinstance(response, dict) else None
            if isinstance(usage, dict):
                i.prompt_eval_count = _int(usage.get("input_tokens"), i.prompt_eval_count)
                i.eval_count = _int(usage.get("output_tokens"), i.eval_count)
        elif event == "message_delta":  # Anthropic: output token count
            usage = obj.get("usage")
            if isinstance(usage, dict):
                i.eval_count = _int(usage.get("output_tokens"), i.eval_count)
        elif event in ("response.failed", "error"):
            i.error = i.clip("error",
                             _error_message(obj.get("error") or obj.get("response") or event))


class JsonReader(ReplyReader):
    """A whole-body JSON reply, kept up to a cap and read when it ends."""

    streamed = False

    def __init__(self, interaction: Interaction, cap: int) -> None:
        super().__init__(interaction)
        self._parts: list[bytes] = []
        self._size = 0
        self._cap = cap
        self._now = 0.0

    def feed(self, chunk: bytes, now: float) -> None:
        self._size += len(chunk)
        self._now = now
        if self._size <= self._cap:
            self._parts.append(chunk)

    def close(self) -> None:
        if self._size > self._cap or not self._parts:
            return
        obj = _loads(b"".join(self._parts))
        self._parts = []
        if obj is None:
            return
        if "choices" in obj or "usage" in obj or obj.get("object") in ("list", "response"):
            self._openai(obj, self._now)
            self.i.done = True
        elif obj.get("type") == "message":  # Anthropic, not streamed
            self.i.done = True
            _response_id(obj, self.i)
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.i.prompt_eval_count = _int(usage.get("input_tokens"), None)
                self.i.eval_count = _int(usage.get("output_tokens"), None)
        else:
            self._native(obj, self._now)


def _response_id(obj: Any, i: Interaction) -> None:
    """The reply's id (`chatcmpl-…`, `resp_…`, `msg_…`), the first one seen."""
    if i.response_id is None and isinstance(obj, dict):
        value = obj.get("id")
        if isinstance(value, str) and value:
            i.response_id = value[:RESPONSE_ID_CAP]


RESPONSE_ID_CAP = 256  # ids are short; a longer one is cut, not kept whole


def reply_reader(content_type: str, interaction: Interaction, json_cap: int) -> ReplyReader:
    ct = content_type.split(";", 1)[0].strip().lower()
    if ct == "application/x-ndjson":
        return NdjsonReader(interaction)
    if ct == "text/event-stream":
        return SseReader(interaction)
    if ct == "application/json":
        return JsonReader(interaction, json_cap)
    return ReplyReader(interaction)


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _model(value: Any, i: Interaction) -> str | None:
    """The model a reply names, cut to the model name's cap, else what was known."""
    return value[: CAPS["model"]] if isinstance(value, str) and value else i.response_model


def _int(value: Any, default: int | None) -> int | None:
    """A count or a duration as Ollama sends them, a whole number from 0 up; anything else is
    not one (a negative count would make a Prometheus counter raise)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else default


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str):
            return message
    if isinstance(error, str):
        return error
    return orjson.dumps(error).decode(errors="replace")


def expects_done(kind: Kind, content_type: str) -> bool:
    """True when a reply that lacks its end marker was cut short (an error, per the reference)."""
    ct = content_type.split(";", 1)[0].strip().lower()
    if ct == "application/x-ndjson":
        return kind is Kind.GENERATE
    if ct == "text/event-stream":
        return kind is Kind.OPENAI
    return False
