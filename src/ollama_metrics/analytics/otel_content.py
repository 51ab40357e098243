"""A call's prompt and reply as the GenAI content attributes of an OpenTelemetry span.

Taken from the record the store would keep (record.build: caps, capture level and redaction
applied), so a span never carries more text than the store: nothing at capture `metadata`.
Attributes are JSON text in the shapes of the GenAI conventions' message schemas:
gen_ai.input.messages, gen_ai.output.messages, gen_ai.system_instructions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson

from ..observe.interaction import Interaction
from . import record
from .privacy import Privacy
from .stores import Record


def builder(privacy: Privacy) -> Callable[[Interaction, dict[str, Any] | None], dict[str, str]]:
    """The content of an exchange, as the store would keep it (`body`: the request's top-level
    parameters, unused here: the content is the Interaction's)."""

    def content(i: Interaction, body: dict[str, Any] | None) -> dict[str, str]:
        return attributes(record.build(dataclasses.replace(i), privacy))  # build lets go of a copy

    return content


def attributes(rec: Record) -> dict[str, str]:
    out: dict[str, str] = {}
    inputs = [m for m in (_message(m) for m in rec["messages"] or []) if m["parts"]]
    if not inputs and rec["prompt"]:
        inputs = [{"role": "user", "parts": [_text(rec["prompt"])]}]
    if inputs:
        out["gen_ai.input.messages"] = _json(inputs)
    if rec["system"] and not rec["messages"]:  # /api/generate's `system`, given apart
        out["gen_ai.system_instructions"] = _json([_text(rec["system"])])
    parts = []
    if rec["thinking"]:
        parts.append({"type": "reasoning", "content": rec["thinking"]})
    if rec["response"]:
        parts.append(_text(rec["response"]))
    parts.extend(_call(c) for c in rec["tool_calls"] or [] if c)
    if parts:
        reason = rec["done_reason"] or ("stop" if rec["outcome"] == "ok" else "error")
        out["gen_ai.output.messages"] = _json(
            [{"role": "assistant", "parts": parts, "finish_reason": reason}])
    return out


def _message(m: dict[str, Any]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    content = m.get("content")
    if isinstance(content, str) and content:
        parts.append(_text(content))
    elif isinstance(content, list):  # OpenAI-style parts; images are kept as references only
        parts.extend(_text(p["text"]) for p in content
                     if isinstance(p, dict) and isinstance(p.get("text"), str))
    if m.get("thinking"):
        parts.append({"type": "reasoning", "content": m["thinking"]})
    parts.extend(_call(c) for c in m.get("tool_calls") or [] if c)
    return {"role": m.get("role") or "user", "parts": parts}


def _text(content: str) -> dict[str, Any]:
    return {"type": "text", "content": content}


def _call(call: dict[str, Any]) -> dict[str, Any]:
    raw = call.get("function")
    function: dict[str, Any] = raw if isinstance(raw, dict) else {}
    part: dict[str, Any] = {"type": "tool_call", "name": function.get("name")}
    if call.get("id") is not None:
        part["id"] = call["id"]
    if "arguments" in function:
        part["arguments"] = function["arguments"]
    return part


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
