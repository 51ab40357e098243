"""Fuzzing what reads copies of the forwarded bytes: the reply readers (NDJSON, SSE, JSON), the
request sniffing, and what is built from them (metrics, the stored record).

Properties: arbitrary bytes, cut into arbitrary chunks, never raise -- not in the readers, not in
the observers that read the Interaction afterwards; a valid NDJSON or SSE stream is read the same
whatever the cuts; and, through the real proxy, arbitrary reply bytes reach the client unchanged.

Hypothesis runs derandomized by default (profile `ci`: the same examples every run, no example
database), so a failure reproduces; `HYPOTHESIS_PROFILE=explore` searches at random, longer.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import StartProxy
from ollama_metrics.analytics import record
from ollama_metrics.analytics.privacy import Privacy
from ollama_metrics.observe.categorize import categorize
from ollama_metrics.observe.interaction import Interaction
from ollama_metrics.observe.labels import ModelLabels
from ollama_metrics.observe.metrics import Metrics, new_registry
from ollama_metrics.ollama.request import read_request
from ollama_metrics.ollama.wire import reply_reader
from wire import upstream

settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Hypothesis builds its failure report under pytest's warnings filter, and imports a deprecated
# module on the way: that must not turn a found bug into an internal error.
pytestmark = [pytest.mark.slow(reason="Hypothesis runs of hundreds of examples each"),
              pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")]

NDJSON, SSE, JSON = "application/x-ndjson", "text/event-stream", "application/json"
CONTENT_TYPES = [NDJSON, SSE, JSON, "application/json; charset=utf-8", "text/plain", ""]

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20)


def shaped(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with any of these fields (each of the given shape, or any JSON at all), so that
    generated data reaches the branches that look for them."""
    return st.fixed_dictionaries({}, optional={k: v | json_values for k, v in fields.items()})


ANY = json_values
ints = st.integers(-5, 10**12)
part = shaped(type=st.sampled_from(["text", "image_url", "image", "input_image"]), text=ANY,
              image_url=shaped(url=ANY), source=shaped(data=ANY))
message = shaped(role=st.sampled_from(["user", "system", "assistant", "developer", "tool"]),
                 content=st.text(max_size=20) | st.lists(part, max_size=3),
                 images=st.lists(ANY, max_size=2), thinking=ANY,
                 tool_calls=st.lists(shaped(function=shaped(name=ANY, arguments=ANY)),
                                     max_size=2), tool_name=ANY, name=ANY, reasoning=ANY)
requests = shaped(model=st.text(max_size=10), name=ANY, prompt=ANY, system=ANY,
                  messages=st.lists(message, max_size=3), images=st.lists(ANY, max_size=2),
                  input=st.text(max_size=10) | st.lists(message | ANY, max_size=3),
                  stream=st.booleans(), options=ANY)
native = shaped(model=ANY, response=ANY, thinking=ANY, message=message, tool_calls=ANY,
                done=st.booleans(), done_reason=ANY, eval_count=ints, prompt_eval_count=ints,
                eval_duration=ints, prompt_eval_duration=ints, load_duration=ints,
                total_duration=ints, error=ANY, embeddings=st.lists(st.lists(ANY)),
                embedding=ANY)
openai = shaped(choices=st.lists(shaped(delta=message, message=message, text=ANY,
                                        finish_reason=ANY), max_size=2),
                usage=shaped(prompt_tokens=ints, completion_tokens=ints, input_tokens=ints,
                             output_tokens=ints),
                error=ANY, data=st.lists(shaped(embedding=ANY)), object=ANY,
                type=st.sampled_from(["response.output_text.delta", "content_block_delta",
                                      "response.completed", "message_stop", "message_delta",
                                      "response.failed", "error", "message"]),
                delta=ANY, response=shaped(usage=ANY))
replies = native | openai


def _lines(objects: list[Any], sse: bool) -> bytes:
    prefix = b"data: " if sse else b""
    end = b"\n\n" if sse else b"\n"
    return b"".join(prefix + orjson.dumps(o) + end for o in objects)


# Bytes a reader may meet: anything at all, or lines of JSON, of Ollama's shapes or any other.
reply_bytes = st.one_of(
    st.binary(max_size=3000),
    st.builds(_lines, st.lists(replies | json_values, max_size=8), st.booleans()),
    st.builds(lambda junk, objs: junk + _lines(objs, False), st.binary(max_size=50),
              st.lists(replies, max_size=4)),
)


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` in chunks cut at arbitrary places (empty chunks included)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def _interaction() -> Interaction:
    return Interaction(method="POST", path="/api/chat", endpoint="/api/chat", started_at=0.0,
                       started=0.0, stream=True)


def _observe(i: Interaction, metrics: Metrics) -> None:
    """What happens to an Interaction once its exchange is over, as in Proxy.handle."""
    i.ended, i.ended_at = 1.0, 1.0
    i.prompt_category = categorize(i.prompt or "")
    metrics.finished(i, metrics.started(i))
    request = i.messages, i.images
    for capture in ("full", "metadata"):
        i.messages, i.images = request  # build() lets go of them
        rec = record.build(i, Privacy(capture=capture, max_messages=4, max_record_bytes=4096))
        assert len(orjson.dumps(rec)) <= 4096


METRICS = Metrics(new_registry(), ModelLabels(5))


def _whole(data: bytes) -> tuple[bytes, list[bytes]]:
    return data, [data]


@given(st.sampled_from(CONTENT_TYPES), reply_bytes.flatmap(
    lambda data: st.tuples(st.just(data), cut(data))))
# Found before: a negative count reached a Prometheus counter (which raises); a tool call whose
# function is not an object broke the record of the metadata capture level.
@example(NDJSON, _whole(b'{"done":true,"eval_count":-5,"prompt_eval_count":-1}\n'))
@example(JSON, _whole(b'{"usage":{"prompt_tokens":-3,"completion_tokens":2}}'))
@example(NDJSON, _whole(b'{"message":{"tool_calls":[{"function":"x"}]}}\n'))
def test_reply_readers_never_raise(content_type: str, reply: tuple[bytes, list[bytes]]) -> None:
    _, chunks = reply
    i = _interaction()
    reader = reply_reader(content_type, i, 2000)
    for n, chunk in enumerate(chunks):
        reader.feed(chunk, float(n))
    reader.close()
    _observe(i, METRICS)


@given(st.one_of(st.binary(max_size=2000), json_values.map(orjson.dumps),
                 requests.map(orjson.dumps)))
# Found before: `images` that is not a list, and a data: URL without a comma, broke the record.
@example(b'{"images":1}')
@example(b'{"messages":[{"role":"user","images":true}]}')
@example(b'{"messages":[{"role":"user","content":[{"type":"image_url","image_url":'
         b'{"url":"data:nocomma"}}]}]}')
def test_request_sniffing_never_raises(body: bytes) -> None:
    i = _interaction()
    read_request(body, i)
    read_request(bytearray(body), _interaction())
    _observe(i, METRICS)


def _summary(i: Interaction) -> tuple[Any, ...]:
    return (i.response_text, "".join(i.thinking_pieces), i.eval_count, i.prompt_eval_count,
            i.done, i.done_reason, i.error, len(i.tool_calls), i.first_token is not None)


texts = st.text(max_size=12)
counts = st.integers(0, 10**6)


@st.composite
def ndjson_streams(draw: st.DrawFn) -> bytes:
    """A native stream as Ollama writes it: token lines, then a final line or an error."""
    chat = draw(st.booleans())
    lines: list[dict[str, Any]] = []
    for token in draw(st.lists(texts, max_size=10)):
        lines.append({"model": "m", "message": {"role": "assistant", "content": token},
                      "done": False} if chat else {"model": "m", "response": token, "done": False})
    if draw(st.booleans()):
        lines.append({"error": draw(texts)})
    else:
        final: dict[str, Any] = {"model": "m", "done": True, "done_reason": "stop",
                                 "eval_count": draw(counts), "prompt_eval_count": draw(counts),
                                 "eval_duration": draw(counts)}
        final.update({"message": {"role": "assistant", "content": ""}} if chat
                     else {"response": ""})
        lines.append(final)
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """An OpenAI-compatible stream: chunks with deltas, a finish, maybe usage, then [DONE]."""
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    events: list[bytes] = []
    for token in draw(st.lists(texts, max_size=10)):
        events.append(orjson.dumps({"choices": [{"index": 0, "delta": {"content": token},
                                                 "finish_reason": None}]}))
    events.append(orjson.dumps({"choices": [{"index": 0, "delta": {},
                                             "finish_reason": "stop"}]}))
    if draw(st.booleans()):
        events.append(orjson.dumps({"choices": [], "usage": {
            "prompt_tokens": draw(counts), "completion_tokens": draw(counts)}}))
    events.append(b"[DONE]")
    return b"".join(b"data: " + e + newline + newline for e in events)


@pytest.mark.parametrize(("content_type", "streams"), [(NDJSON, ndjson_streams()),
                                                       (SSE, sse_streams())], ids=["ndjson", "sse"])
@given(data=st.data())
def test_valid_streams_read_the_same_whatever_the_cuts(
    content_type: str, streams: st.SearchStrategy[bytes], data: st.DataObject,
) -> None:
    stream = data.draw(streams)
    chunks = data.draw(cut(stream))
    whole, split = _interaction(), _interaction()
    reader = reply_reader(content_type, whole, 2000)
    reader.feed(stream, 0.0)
    reader.close()
    reader = reply_reader(content_type, split, 2000)
    for chunk in chunks:
        reader.feed(chunk, 0.0)
    reader.close()
    assert _summary(split) == _summary(whole)
    assert whole.done != (whole.error is not None)  # a complete stream, or an error line


# --- through the proxy ------------------------------------------------------------------------

PLANS: dict[str, tuple[str, list[bytes], bool]] = {}  # id -> (Content-Type, pieces, length?)


def _planned() -> web.Application:
    """An Ollama whose reply to POST /api/chat?plan=ID is PLANS[ID], piece by piece."""

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        content_type, pieces, with_length = PLANS[request.query["plan"]]
        response = web.StreamResponse(headers={"Content-Type": content_type})
        if with_length:
            response.content_length = sum(len(p) for p in pieces)
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    return app


@pytest.fixture
async def planned_proxy(start_proxy: StartProxy) -> AsyncIterator[str]:
    async with upstream(_planned()) as ollama:
        proxy = await start_proxy(ollama.url)
        yield proxy.url


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([*CONTENT_TYPES[:4], "application/octet-stream"]),
       reply_bytes.flatmap(lambda data: cut(data)), st.booleans(), requests)
async def test_reply_bytes_pass_through_unchanged(
    planned_proxy: str, content_type: str, pieces: list[bytes], with_length: bool,
    request: dict[str, Any],
) -> None:
    plan = str(len(PLANS))
    PLANS[plan] = (content_type, pieces, with_length)
    async with aiohttp.ClientSession(auto_decompress=False) as http, http.post(
            f"{planned_proxy}/api/chat?plan={plan}", data=orjson.dumps(request)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == content_type
        assert await resp.read() == b"".join(pieces)
    del PLANS[plan]  # and the proxy logged no error reading it (the no_error_logs fixture)
