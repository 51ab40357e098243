"""A finished Interaction as a stored record: the FIELDS of stores, caps and privacy applied.

Runs after the reply has been sent, never on the forward path. Images are kept as count, size
and sha256, never their base64; embedding requests keep their input text and the vector size,
never the vectors. Every value a client controls is bounded: the messages kept (the first and
last halves of `max_messages`, a marker `{"elided": n}` between them), each text, each name, the
image references, the tool calls and their arguments, `options` (known keys, scalar values) and
the whole record's JSON size (texts are shortened further to fit). The fields so shortened are
named in `truncated_fields`. Every text, name and option passes through Privacy; at the
`metadata` level none is kept.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from ..observe.interaction import Interaction, Message, ends
from ..ollama.request import image_digest, is_image_url
from .privacy import TRUNCATED, Privacy
from .stores import Record

NAME_CHARS = 256  # roles, tool and function names, call ids, `options` strings
URL_CHARS = 512  # a remote image's URL
ERROR_CHARS = 4096
MAX_IMAGES = 64  # image references kept per record; `image_count` counts them all
MAX_CALLS = 32  # tool calls kept per message and per reply
MAX_STOP = 16  # `stop` strings kept
_ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))
# Ollama's model options (api.Options and api.Runner, with older ones clients still send).
_OPTIONS = frozenset((
    "num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n",
    "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty", "stop", "num_ctx",
    "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "mirostat", "mirostat_tau",
    "mirostat_eta", "penalize_newline", "tfs_z", "numa", "low_vram", "f16_kv", "vocab_only",
    "use_mlock", "logits_all", "embedding_only"))


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # what orjson refuses (integers past 64 bits) the standard library writes
        return json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "replace")


class _Slot:
    """A text (or a JSON value: tool-call arguments) whose stored length is settled last, once
    the size of the whole record is known."""

    __slots__ = ("container", "field", "key", "raw", "size")

    def __init__(self, container: Any, key: Any, field: str, raw: Any) -> None:
        self.container, self.key, self.field, self.raw = container, key, field, raw
        self.size = len(raw) if isinstance(raw, str) else len(_dumps(raw))


class _Builder:
    def __init__(self, privacy: Privacy, digested: bool = False) -> None:
        self.p = privacy
        self.digested = digested  # Interaction.images_digested
        self.marks: set[str] = set()  # fields shortened while the record is shaped
        self.slots: list[_Slot] = []
        self.images: list[dict[str, Any]] = []
        self.image_count = 0

    def slot(self, container: Any, key: Any, field: str, raw: Any) -> None:
        """Put `raw` at container[key] once its length is settled; nothing at `metadata`."""
        container[key] = None
        if raw is not None and self.p.keeps_text:
            self.slots.append(_Slot(container, key, field, raw))

    def name(self, value: Any, field: str, limit: int = NAME_CHARS) -> str | None:
        """A short client string (a name, an id): redacted and capped; none at `metadata`."""
        if not isinstance(value, str):
            return None
        kept, cut = self.p.text(value, limit)
        if cut:
            self.marks.add(field)
        return kept

    def image(self, data: Any) -> dict[str, Any] | None:
        self.image_count += 1
        if len(self.images) >= MAX_IMAGES:
            self.marks.add("images")
            return None
        if is_image_url(data):
            ref: dict[str, Any] = {"url": self.name(data, "images", URL_CHARS)}
        elif self.digested and isinstance(data, dict):  # made where the body was parsed
            ref = {"bytes": data.get("bytes"), "sha256": data.get("sha256")}
        else:
            ref = image_digest(data)
        self.images.append(ref)
        return ref

    def calls(self, raw: Any, field: str) -> list[dict[str, Any]] | None:
        """Tool calls in a known shape (id, type, index, function name and arguments), at most
        MAX_CALLS; at `metadata` one empty entry per call, so only their number is kept."""
        calls = _list(raw)
        if not calls:
            return None
        if len(calls) > MAX_CALLS:
            self.marks.add(field)
            calls = calls[:MAX_CALLS]
        if not self.p.keeps_text:
            return [{} for _ in calls]
        kept = []
        for call in calls:
            if not isinstance(call, dict):
                continue
            out: dict[str, Any] = {}
            for key in ("id", "type"):
                if isinstance(call.get(key), str):
                    out[key] = self.name(call[key], field)
            if isinstance(call.get("index"), int) and not isinstance(call["index"], bool):
                out["index"] = call["index"]
            function = call.get("function")
            if isinstance(function, dict):
                fn: dict[str, Any] = {}
                if "name" in function:
                    fn["name"] = self.name(function["name"], field)
                if "arguments" in function:
                    self.slot(fn, "arguments", field, function["arguments"])
                out["function"] = fn
            kept.append(out)
        return kept

    def messages(self, raw: list[Message] | None) -> list[dict[str, Any]] | None:
        if raw is None:
            return None
        cut, elided = ends(raw, self.p.max_messages)
        kept: list[Message | None] = [*cut]
        if elided:
            self.marks.add("messages")
            kept.insert(self.p.max_messages // 2, None)  # where `ends` left them out
        messages = []
        for m in kept:
            if m is None:
                messages.append({"elided": elided})
                continue
            role = m.role
            message: dict[str, Any] = {
                "role": role if isinstance(role, str) and role in _ROLES
                else self.name(role, "messages.role")}
            self.slot(message, "content", "messages.content", m.text)
            own = [ref for data in m.images or () if (ref := self.image(data)) is not None]
            if own:
                message["images"] = own
            if self.p.keeps_text:
                if m.thinking:
                    self.slot(message, "thinking", "messages.thinking", str(m.thinking))
                if calls := self.calls(m.tool_calls, "messages.tool_calls"):
                    message["tool_calls"] = calls
                for key, value in (("tool_name", m.tool_name), ("tool_call_id", m.tool_call_id),
                                   ("name", m.name)):
                    if value:
                        message[key] = self.name(value, f"messages.{key}")
            messages.append(message)
        return messages

    def options(self, raw: dict[str, Any] | None) -> dict[str, Any] | None:
        """Ollama's known options with scalar values (`stop`: a few strings); none at
        `metadata`."""
        if raw is None or not self.p.keeps_text:
            return None
        kept: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in _OPTIONS:
                self.marks.add("options")
            elif isinstance(value, (bool, float)) or (
                    isinstance(value, int) and -2**63 <= value < 2**63):
                kept[key] = value
            elif isinstance(value, str):
                kept[key] = self.name(value, "options")
            elif key == "stop" and isinstance(value, list):
                stops = [self.name(s, "options") for s in value[:MAX_STOP] if isinstance(s, str)]
                if len(stops) < len(value):
                    self.marks.add("options")
                kept[key] = stops
            else:
                self.marks.add("options")
        return kept

    def settle(self, limit: int) -> set[str]:
        """Write every slot's value, at most `limit` characters; the fields that were cut."""
        cut_fields = set()
        for s in self.slots:
            if isinstance(s.raw, str):
                value, cut = self.p.text(s.raw, limit)
            elif s.size <= min(limit, self.p.limit):  # small JSON: kept as it is, redacted
                value, cut = _scrub_json(s.raw, self.p), False
            else:  # large JSON: its text, cut
                value, cut = self.p.text(_dumps(s.raw).decode("utf-8", "replace"), limit)
            s.container[s.key] = value
            if cut:
                cut_fields.add(s.field)
        return cut_fields

    def fit(self, record: Record) -> set[str]:
        """Settle the slots so that the record's JSON is at most max_record_bytes; the fields
        cut. Texts are given equal shares of what the rest of the record leaves."""
        cap = self.p.max_record_bytes
        for s in self.slots:
            s.container[s.key] = ""
        room = cap - len(_dumps(record)) - len(self.slots) * len(TRUNCATED.encode())
        limit = min(self.p.limit, _fair_share([s.size for s in self.slots], room))
        for _ in range(4):
            cut = self.settle(limit)
            size = len(_dumps(record))
            if size <= cap:
                return cut | ({"record"} if limit < self.p.limit and cut else set())
            # Escapes and multi-byte characters made texts longer than their characters.
            limit = limit * max(room, 0) // max(size - cap + room, 1) - 1
            if limit <= 0:
                break
        # Even empty texts do not fit: what is left is the structure around them.
        cut = self.settle(0) | {"record"}
        for key in ("messages", "tool_calls", "images", "options"):
            if len(_dumps(record)) <= cap:
                break
            if record[key] is not None:
                record[key] = None
                cut.add(key)
        return cut


def _fair_share(sizes: list[int], room: int) -> int:
    """The largest L for which sum(min(size, L)) <= room: short texts are kept whole, long ones
    share what is left equally."""
    left = len(sizes)
    for size in sorted(sizes):
        if size * left > room:
            return max(room, 0) // left
        room -= size
        left -= 1
    return 1 << 62


def build(i: Interaction, privacy: Privacy) -> Record:
    """The record of `i`. Fields the proxy already shortened on the Interaction (`i.capped`: the
    model name, the error text, a body left unread) are named in `truncated_fields` with the
    record's own."""
    b = _Builder(privacy, i.images_digested)
    messages = b.messages(i.messages)
    for data in i.images or ():  # /api/generate
        b.image(data)
    i.messages = i.images = None  # large requests (images) should not outlive the exchange
    error = None
    if i.error and privacy.keeps_text:  # not cut to `truncated`'s length: it is a diagnosis
        error, cut = privacy.clip(i.error, ERROR_CHARS)
        if cut:
            b.marks.add("error")
    record: Record = {
        "id": i.id,
        "started_at": i.started_at,
        "ended_at": i.ended_at,
        "client_ip": i.client_ip,
        "user_agent": _short(i.user_agent, "user_agent", 1024, b.marks),
        "method": _short(i.method, "method", 32, b.marks),
        "path": _short(i.path, "path", 2048, b.marks),
        "endpoint": i.endpoint,
        "model": i.model,
        "stream": i.stream,
        "options": b.options(i.options),
        "http_status": i.http_status,
        "outcome": i.outcome.value,
        "error": error,
        "prompt": None,
        "messages": messages,
        "system": None,
        "response": None,
        "thinking": None,
        "tool_calls": b.calls(i.tool_calls, "tool_calls"),
        "images": b.images or None,
        "image_count": b.image_count,
        "prompt_category": i.prompt_category,
        "ttft": i.ttft,
        "duration": i.duration,
        "total_duration": _seconds(i.total_duration_ns),
        "load_duration": _seconds(i.load_duration_ns),
        "prompt_eval_duration": _seconds(i.prompt_eval_duration_ns),
        "eval_duration": _seconds(i.eval_duration_ns),
        "prompt_tokens": i.prompt_eval_count,
        "completion_tokens": i.eval_count,
        "tokens_estimated": i.tokens_estimated,
        "tokens_per_second": i.tokens_per_second,
        "request_bytes": i.request_bytes,
        "response_bytes": i.response_bytes,
        "done_reason": i.done_reason,
        "embedding_dims": i.embedding_dims,
        "truncated": False,
        "truncated_fields": None,
        "capture": privacy.capture,
    }
    b.slot(record, "prompt", "prompt", i.prompt)
    b.slot(record, "system", "system", i.system)
    if i.response_pieces:
        b.slot(record, "response", "response", i.response_text)
    if i.thinking_pieces:
        b.slot(record, "thinking", "thinking", "".join(i.thinking_pieces))
    # Sized at the longest its marks can be, so that they still fit once written.
    record["truncated"] = True
    record["truncated_fields"] = sorted(b.marks | i.capped | {s.field for s in b.slots}
                                        | {"record"})
    fields = b.marks | b.fit(record) | i.capped
    record["truncated"] = bool(fields)
    record["truncated_fields"] = sorted(fields) or None
    return record


def _short(value: str | None, field: str, limit: int, marks: set[str]) -> str | None:
    """Request-line and header values: bounded by aiohttp already, capped again here."""
    if value is None or len(value) <= limit:
        return value
    marks.add(field)
    return value[:limit] + TRUNCATED


def _list(value: Any) -> list[Any]:
    """A list field of a request as sent, or none: a client may send any JSON at all."""
    return value if isinstance(value, list) else []


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e9


def _scrub_json(value: Any, privacy: Privacy) -> Any:
    """Redact every string inside a JSON value, keys too (tool call arguments carry user data)."""
    if isinstance(value, str):
        return privacy.scrub(value)
    if isinstance(value, list):
        return [_scrub_json(v, privacy) for v in value]
    if isinstance(value, dict):
        return {privacy.scrub(k): _scrub_json(v, privacy) for k, v in value.items()}
    return value
