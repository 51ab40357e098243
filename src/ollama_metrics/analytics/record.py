"""A finished Interaction as a stored record: the FIELDS of stores, privacy already applied.

Runs after the reply has been sent, never on the forward path. Images are kept as count, size
and sha256, never their base64; embedding requests keep their input text and the vector size,
never the vectors; every text passes through Privacy.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from typing import Any

from ..interaction import Interaction
from .privacy import Privacy
from .stores import Record

_B64_SLICE = 1 << 20  # base64 characters decoded at a time (a multiple of 4)
_NOT_B64 = re.compile(r"[^A-Za-z0-9+/=]")


def _image_ref(data: Any) -> dict[str, Any]:
    """{"bytes", "sha256"} of a base64 image (bare or a data: URL), or the URL of a remote one."""
    if not isinstance(data, str):
        return {"bytes": None, "sha256": None}
    if data.startswith(("http://", "https://")):
        return {"url": data[:500]}
    start = data.find(",") + 1 if data.startswith("data:") else 0
    # Decoded a slice at a time, so a 20 MB image never exists decoded in memory at once. Only
    # clean base64 splits into whole four-character groups; anything else is decoded whole.
    step = len(data) if _NOT_B64.search(data, start) else _B64_SLICE
    digest, size = hashlib.sha256(), 0
    try:
        for at in range(start, len(data), step):
            raw = binascii.a2b_base64(data[at:at + step])
            digest.update(raw)
            size += len(raw)
    except (binascii.Error, ValueError):
        return {"bytes": len(data) - start, "sha256": None}
    return {"bytes": size, "sha256": digest.hexdigest()}


def _content(content: Any, images: list[dict[str, Any]]) -> str:
    """Text of a message content (a string or a list of parts); image parts go to `images`."""
    if isinstance(content, str):
        return content
    texts = []
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                images.append(_image_ref(url.get("url") if isinstance(url, dict) else url))
            elif kind in ("image", "input_image"):
                source = part.get("source")
                data = source.get("data") if isinstance(source, dict) else part.get("image_url")
                images.append(_image_ref(data))
    return "\n".join(texts)


def _messages(body: dict[str, Any], images: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    raw = body.get("messages")
    if raw is None and isinstance(body.get("input"), list):  # /v1/responses
        raw = [m for m in body["input"] if isinstance(m, dict) and "role" in m] or None
    if not isinstance(raw, list):
        return None
    messages = []
    for m in raw:
        if not isinstance(m, dict):
            continue
        own: list[dict[str, Any]] = []
        message: dict[str, Any] = {"role": m.get("role"),
                                   "content": _content(m.get("content"), own)}
        for data in _list(m.get("images")):  # native chat: base64 strings
            own.append(_image_ref(data))
        if own:
            message["images"] = own
            images.extend(own)
        for key in ("thinking", "tool_calls", "tool_name", "tool_call_id", "name"):
            if m.get(key):
                message[key] = m[key]
        messages.append(message)
    return messages


def _input_text(body: dict[str, Any]) -> str | None:
    """The text an embedding request embeds (all inputs, one per line)."""
    inp = body.get("input", body.get("prompt"))
    if isinstance(inp, str):
        return inp
    if isinstance(inp, list) and all(isinstance(x, str) for x in inp):
        return "\n".join(inp)
    return None


def build(i: Interaction, privacy: Privacy) -> Record:
    body = i.request_json or {}
    i.request_json = None  # large bodies (images) should not outlive the exchange
    images: list[dict[str, Any]] = []
    messages = _messages(body, images)
    for data in _list(body.get("images")):  # /api/generate
        images.append(_image_ref(data))
    prompt = i.prompt
    if i.embedding_dims is not None or i.endpoint in ("/api/embed", "/v1/embeddings"):
        prompt = _input_text(body) or prompt

    truncated = False

    def text(value: str | None) -> str | None:
        nonlocal truncated
        kept, cut = privacy.text(value)
        truncated |= cut
        return kept

    if messages is not None:
        for m in messages:
            if privacy.keeps_text:
                m["content"] = text(m["content"])
                if "thinking" in m:
                    m["thinking"] = text(str(m["thinking"]))
            else:
                m["content"] = None
                m.pop("thinking", None)
                m.pop("tool_calls", None)
    tool_calls: list[Any] | None = i.tool_calls or None
    if tool_calls and not privacy.keeps_text:  # names only
        tool_calls = [{"name": _name(c.get("function"))} if isinstance(c, dict)
                      else None for c in tool_calls]
    elif tool_calls:
        tool_calls = [_scrub_json(c, privacy) for c in tool_calls]
    return {
        "id": i.id,
        "started_at": i.started_at,
        "ended_at": i.ended_at,
        "client_ip": i.client_ip,
        "user_agent": i.user_agent,
        "method": i.method,
        "path": i.path,
        "endpoint": i.endpoint,
        "model": i.model,
        "stream": i.stream,
        "options": i.options,
        "http_status": i.http_status,
        "outcome": i.outcome.value,
        "error": privacy.scrub(i.error) if i.error else None,
        "prompt": text(prompt),
        "messages": messages,
        "system": text(i.system),
        "response": text(i.response_text) if i.response_pieces else None,
        "thinking": text("".join(i.thinking_pieces)) if i.thinking_pieces else None,
        "tool_calls": tool_calls,
        "images": images or None,
        "image_count": len(images),
        "prompt_category": i.prompt_category,
        "ttft": i.ttft,
        "duration": i.duration,
        "total_duration": _seconds(i.total_duration_ns),
        "load_duration": _seconds(i.load_duration_ns),
        "prompt_eval_duration": _seconds(i.prompt_eval_duration_ns),
        "eval_duration": _seconds(i.eval_duration_ns),
        "prompt_tokens": i.prompt_eval_count,
        "completion_tokens": i.eval_count,
        "tokens_per_second": i.tokens_per_second,
        "request_bytes": i.request_bytes,
        "response_bytes": i.response_bytes,
        "done_reason": i.done_reason,
        "embedding_dims": i.embedding_dims,
        "truncated": truncated,
        "capture": privacy.capture,
    }


def _list(value: Any) -> list[Any]:
    """A list field of a request as sent, or none: a client may send any JSON at all."""
    return value if isinstance(value, list) else []


def _name(function: Any) -> Any:
    return function.get("name") if isinstance(function, dict) else None


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e9


def _scrub_json(value: Any, privacy: Privacy) -> Any:
    """Redact every string inside a JSON value (tool call arguments carry user data too)."""
    if isinstance(value, str):
        return privacy.scrub(value)
    if isinstance(value, list):
        return [_scrub_json(v, privacy) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_json(v, privacy) for k, v in value.items()}
    return value
