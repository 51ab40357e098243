"""The proxy's own error replies (Ollama unreachable, too slow, the connection broken), in the
shape of the API the client speaks, so its library can say why.

Ollama's native routes answer errors as `{"error": "text"}`; its OpenAI-compatible routes
(`/v1/*`) as OpenAI does, `{"error": {"message", "type", "param", "code"}}`, which is all the
openai SDKs read (a plain string there leaves them with only the status code).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

OPENAI_PREFIX = "/v1/"


def error_body(path: str, message: str, code: str) -> dict[str, Any]:
    """The error object for a request to `path`; `code` is a short machine-readable reason
    (the OpenAI shape has a field for it)."""
    if path.startswith(OPENAI_PREFIX):
        # "api_error": the type Ollama's own OpenAI layer gives its 5xx answers.
        return {"error": {"message": message, "type": "api_error", "param": None, "code": code}}
    return {"error": message}


def error_reply(path: str, status: int, message: str, code: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(error_body(path, message, code)),
                        content_type="application/json", charset="utf-8")
