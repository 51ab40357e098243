"""The request reader: a JSON request body parsed once into what metrics and analytics need.

It fills the Interaction with the model, stream flag, options, system and prompt text, the chat
messages (role, text, images, thinking, tool calls and their names) and /api/generate's images.
One rule makes text of message content everywhere: a string as it is, a list of content parts
(OpenAI, Anthropic, /v1/responses) as the text of its text parts joined by "\\n". Images and
other client values are kept by reference, never decoded, hashed or copied here: this may run on
the event loop, and analytics bounds and hashes them later, off it.

Total like every reader: bad JSON or an unexpected shape only means less is learned. The wire
reference is shared/reference/ollama-api.md.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from typing import Any

import orjson

from ..observe.interaction import Interaction, Message, ends
from .names import normalize_model

_NO_IMAGE = object()
_B64_SLICE = 1 << 20  # base64 characters decoded at a time (a multiple of 4)
_NOT_B64 = re.compile(r"[^A-Za-z0-9+/=]")


# OpenAI-style generation parameters, given at the top of the body (Ollama's own are `options`).
GENERATION_PARAMS = ("temperature", "top_p", "top_k", "frequency_penalty", "presence_penalty",
                     "seed", "max_tokens", "max_completion_tokens", "max_output_tokens", "n",
                     "stop")


def _small(value: Any) -> bool:
    """A number, a short string or a few short strings: all a parameter may be, kept."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    if isinstance(value, str):
        return len(value) <= 256
    return (isinstance(value, list) and len(value) <= 16
            and all(isinstance(v, str) and len(v) <= 256 for v in value))


def is_image_url(data: Any) -> bool:
    return isinstance(data, str) and data.startswith(("http://", "https://"))


def image_digest(data: Any) -> dict[str, Any]:
    """{"bytes", "sha256"} of a base64 image (bare or a data: URL)."""
    if not isinstance(data, str):
        return {"bytes": None, "sha256": None}
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


# What read_request may set on an Interaction.
REQUEST_FIELDS = ("model", "stream", "options", "params", "images", "messages", "prompt",
                  "system", "capped")


def read_request_apart(body: bytes | bytearray, keep_messages: int, stream: bool
                       ) -> dict[str, Any]:
    """read_request in another process, for a body whose parse would hold the event loop's GIL
    too long: the fields it set, with the messages cut to the first and last halves of
    `keep_messages` (all a record keeps) and `messages_elided` saying how many were left out,
    and each image that is not a URL replaced by its `image_digest` (`images_digested`), so
    what crosses back is a record's worth. Prompt and system text are read before the cut.
    `stream` is the route's default, kept when the body does not say."""
    i = Interaction(method="", path="", endpoint="", started_at=0.0, started=0.0, stream=stream)
    read_request(body, i)
    fields = {name: getattr(i, name) for name in REQUEST_FIELDS}
    messages = i.messages
    if messages is not None:
        messages, fields["messages_elided"] = ends(messages, keep_messages)
        fields["messages"] = messages
    fields["images_digested"] = True
    if i.images is not None:
        fields["images"] = _digests(i.images)
    for m in messages or ():
        if m.images:
            m.images = _digests(m.images)
    return fields


def _digests(images: list[Any]) -> list[Any]:
    return [data if is_image_url(data) else image_digest(data) for data in images]


def read_request(body: bytes | bytearray, interaction: Interaction) -> None:
    """Fill `interaction` from a JSON request body."""
    if not body or body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if not isinstance(data, dict):
        return
    i = interaction
    model = data.get("model", data.get("name"))  # "name" is /api/show's deprecated alias
    if isinstance(model, str) and model:
        i.model = i.clip("model", normalize_model(model))
    stream = data.get("stream")
    if isinstance(stream, bool):
        i.stream = stream
    options = data.get("options")
    if isinstance(options, dict):
        i.options = options
    params = {k: data[k] for k in GENERATION_PARAMS if _small(data.get(k))}
    if params:
        i.params = params
    images = data.get("images")  # /api/generate: base64 strings
    if isinstance(images, list):
        i.images = images
    raw = data.get("messages")
    inp = data.get("input")  # /api/embed, /v1/embeddings: texts; /v1/responses: messages too
    if raw is None and isinstance(inp, list):
        raw = [m for m in inp if isinstance(m, dict) and "role" in m] or None
    if isinstance(raw, list):
        i.messages = [_message(m) for m in raw if isinstance(m, dict)]
    prompt: Any = None
    if "messages" in data:
        prompt = _last_user_text(i.messages) if isinstance(data["messages"], list) else None
    elif "prompt" in data:  # /api/generate, /v1/completions, /api/embeddings
        prompt = data["prompt"]
    elif isinstance(inp, str):
        prompt = inp
    elif isinstance(inp, list):
        prompt = _last_user_text(i.messages) if i.messages is not None \
            else "\n".join(x for x in inp if isinstance(x, str))
    if isinstance(prompt, str):
        i.prompt = prompt
    i.system = _system_text(data.get("system"), i.messages)


def _message(m: dict[str, Any]) -> Message:
    content = m.get("content")
    if isinstance(content, str) and len(m) <= 2:  # {"role", "content"}: most messages, fast
        return Message(m.get("role"), content)
    images: list[Any] = []
    text = _text(content, images)
    sent = m.get("images")  # native chat: base64 strings
    if isinstance(sent, list):
        images = [*images, *sent] if images else sent
    return Message(m.get("role"), text, images or None, m.get("thinking"), m.get("tool_calls"),
                   m.get("tool_name"), m.get("tool_call_id"), m.get("name"))


def _text(content: Any, images: list[Any] | None = None) -> str:
    """Text of message content: a string, or the text parts of a list of content parts joined
    by "\\n"; the image parts' references go to `images`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
            continue
        if images is None:
            continue
        kind = part.get("type")
        data: Any = _NO_IMAGE
        if kind == "image_url":  # OpenAI: {"url": ...} or the URL itself
            url = part.get("image_url")
            data = url.get("url") if isinstance(url, dict) else url
        elif kind in ("image", "input_image"):  # Anthropic's source, /v1/responses' URL
            source = part.get("source")
            data = source.get("data") if isinstance(source, dict) else part.get("image_url")
        if data is not _NO_IMAGE:
            images.append(data)
    return "\n".join(texts)


def _last_user_text(messages: list[Message] | None) -> str:
    for message in reversed(messages or ()):
        if message.role == "user":
            return message.text
    return ""


def _system_text(system: Any, messages: list[Message] | None) -> str | None:
    if system is not None:  # /api/generate, Anthropic
        return _text(system) or None
    parts = [m.text for m in messages or () if m.role in ("system", "developer")]
    return "\n".join(parts) or None
