"""Ollama's OpenAI-compatible routes: /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/models."""

from __future__ import annotations

import base64
import random
import struct
import time
from typing import Any

from aiohttp import web

from fake.scenario import (
    JSON_PLAIN,
    JSON_UTF8,
    RUNNER_ERROR,
    SSE,
    Scenario,
    _Ctx,
    _Frames,
)
from fake.server import FakeServer
from fake.wire import (
    _decode,
    _json,
    _oa_err,
    _sse,
    _vector,
)


class OpenAIRoutes(FakeServer):
    """The OpenAI-compatible /v1 routes."""

    # --- OpenAI compatibility ---

    def _oa_request(self, ctx: _Ctx, go_type: str,
                    ) -> tuple[dict[str, Any], Scenario] | web.Response:
        req = _decode(ctx.body, go_type)
        if isinstance(req, str):
            return _oa_err(400, req, JSON_UTF8)
        if go_type == "openai.ChatCompletionRequest" and not req.get("messages"):
            return _oa_err(400, "[] is too short - 'messages'", JSON_UTF8)
        model = req.get("model") or ""
        sc = self._find(model)
        if sc is None:
            if not model:
                return _oa_err(400, "model is required")
            return _oa_err(404, f"model '{model}' not found")
        return req, sc

    @staticmethod
    def _usage(sc: Scenario) -> dict[str, int]:
        completion = sc.metrics().get("eval_count", 0)
        return {"prompt_tokens": sc.prompt_eval_count, "completion_tokens": completion,
                "total_tokens": sc.prompt_eval_count + completion}

    @staticmethod
    def _include_usage(req: dict[str, Any]) -> bool:
        options = req.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    async def _v1_chat(self, ctx: _Ctx) -> web.StreamResponse:
        parsed = self._oa_request(ctx, "openai.ChatCompletionRequest")
        if isinstance(parsed, web.Response):
            return parsed
        req, sc = parsed
        model: str = req["model"]
        prelude = await self._prelude(sc, openai=True)
        if prelude is not None:
            return prelude
        cid = f"chatcmpl-{random.randrange(999)}"
        tools = self._oa_tool_calls(sc)
        usage = self._usage(sc)
        finish = "tool_calls" if tools and sc.done_reason == "stop" else sc.done_reason
        n_items = len(sc.thinking) + len(sc.tokens) + bool(tools) + 1
        if req.get("stream") is not True:
            failed = await self._pace(ctx, sc, n_items, lambda: _oa_err(500, RUNNER_ERROR))
            if failed is not None:
                return failed
            message: dict[str, Any] = {"role": "assistant", "content": "".join(sc.tokens)}
            if sc.thinking:
                message["reasoning"] = "".join(sc.thinking)
            if tools:
                message["tool_calls"] = tools
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return _json({"id": cid, "object": "chat.completion", "created": int(time.time()),
                          "model": model, "system_fingerprint": "fp_ollama", "choices": [choice],
                          "usage": usage}, ctype=JSON_PLAIN, newline=True, gzip=sc.gzip)

        # Current format: role only on the first chunk, created pinned to the first
        # chunk, a separate finish chunk, usage chunk only with include_usage.
        state: dict[str, Any] = {"created": None, "role": True}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None,
                  name: str = model) -> dict[str, Any]:
            if state["created"] is None:
                state["created"] = int(time.time())
            if state["role"] and finish_reason is None:
                delta = {"role": "assistant", **delta}
                state["role"] = False
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {"id": cid, "object": "chat.completion.chunk", "created": state["created"],
                    "model": name, "system_fingerprint": "fp_ollama", "choices": [choice]}

        def event(delta: dict[str, Any]) -> _Frames:
            return lambda: [_sse(chunk(delta))]

        def closing() -> list[bytes]:
            frames = [_sse(chunk({"content": ""}))] if state["role"] else []  # empty completion
            frames.append(_sse(chunk({}, finish)))
            if self._include_usage(req):
                frames.append(_sse({**chunk({}, finish), "choices": [], "usage": usage}))
            return [*frames, b"data: [DONE]\n\n"]

        items = [event({"content": "", "reasoning": t}) for t in sc.thinking]
        items += [event({"content": t}) for t in sc.tokens]
        if tools:
            items.append(event({"content": "", "tool_calls": tools}))
        items.append(closing)
        # Ollama's in-band {"error"} line becomes an empty-delta chunk with no model,
        # and the stream then ends without [DONE].
        resp, _ = await self._stream(ctx, sc, SSE, items,
                                     lambda: _sse(chunk({"content": ""}, name="")),
                                     lambda: _oa_err(500, RUNNER_ERROR))
        return resp

    async def _v1_completions(self, ctx: _Ctx) -> web.StreamResponse:
        parsed = self._oa_request(ctx, "openai.CompletionRequest")
        if isinstance(parsed, web.Response):
            return parsed
        req, sc = parsed
        model: str = req["model"]
        prelude = await self._prelude(sc, openai=True)
        if prelude is not None:
            return prelude
        cid = f"cmpl-{random.randrange(999)}"
        usage = self._usage(sc)
        texts = [""] * len(sc.thinking) + list(sc.tokens) + ([""] if sc.tool_calls else [])
        if req.get("stream") is not True:
            failed = await self._pace(ctx, sc, len(texts) + 1, lambda: _oa_err(500, RUNNER_ERROR))
            if failed is not None:
                return failed
            choice = {"text": "".join(texts), "index": 0, "finish_reason": sc.done_reason}
            return _json({"id": cid, "object": "text_completion", "created": int(time.time()),
                          "model": model, "system_fingerprint": "fp_ollama", "choices": [choice],
                          "usage": usage}, ctype=JSON_PLAIN, newline=True, gzip=sc.gzip)
        include_usage = self._include_usage(req)

        def chunk(text: str, finish_reason: str | None = None, name: str = model) -> dict[str, Any]:
            choice = {"text": text, "index": 0, "finish_reason": finish_reason}
            obj: dict[str, Any] = {"id": cid, "object": "text_completion",
                                   "created": int(time.time()), "choices": [choice],
                                   "model": name, "system_fingerprint": "fp_ollama"}
            if include_usage:  # quirk: every chunk carries zero usage
                obj["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            return obj

        def closing() -> list[bytes]:
            frames = [_sse(chunk("", sc.done_reason))]
            if include_usage:
                frames.append(_sse({**chunk(""), "choices": [], "usage": usage}))
            return [*frames, b"data: [DONE]\n\n"]

        def event(text: str) -> _Frames:
            return lambda: [_sse(chunk(text))]

        items = [event(t) for t in texts]
        items.append(closing)
        resp, _ = await self._stream(ctx, sc, SSE, items, lambda: _sse(chunk("", name="")),
                                     lambda: _oa_err(500, RUNNER_ERROR))
        return resp

    async def _v1_embeddings(self, ctx: _Ctx) -> web.StreamResponse:
        parsed = self._oa_request(ctx, "openai.EmbedRequest")
        if isinstance(parsed, web.Response):
            return parsed
        req, sc = parsed
        model: str = req["model"]
        inputs = self._embed_inputs(req.get("input"))
        if not inputs:
            return _oa_err(400, "invalid input", JSON_UTF8)
        prelude = await self._prelude(sc, openai=True)
        if prelude is not None:
            return prelude
        dims = int(req.get("dimensions") or sc.embedding_dims)
        data = []
        for i, text in enumerate(inputs):
            vec: Any = _vector(model, text, dims)
            if str(req.get("encoding_format", "")).lower() == "base64":
                vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": vec, "index": i})
        usage = {"prompt_tokens": sc.prompt_eval_count, "total_tokens": sc.prompt_eval_count}
        return _json({"object": "list", "data": data, "model": model, "usage": usage},
                     ctype=JSON_PLAIN, newline=True, gzip=sc.gzip)

    def _oa_model(self, name: str) -> dict[str, Any]:
        parts = name.split("/")
        owner = parts[-2] if len(parts) > 1 else "library"
        created = self._born_ns // 1_000_000_000
        return {"id": name, "object": "model", "created": created, "owned_by": owner}

    async def _v1_models(self, ctx: _Ctx) -> web.StreamResponse:
        data = [self._oa_model(n) for n in self._models()] or None
        return _json({"object": "list", "data": data}, ctype=JSON_PLAIN, newline=True)

    async def _v1_model(self, ctx: _Ctx) -> web.StreamResponse:
        if self._find(ctx.param) is None:
            return _oa_err(404, f"model '{ctx.param}' not found")
        return _json(self._oa_model(ctx.param), ctype=JSON_PLAIN, newline=True)
