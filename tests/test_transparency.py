"""A client cannot tell the proxy from Ollama: same status, headers that matter, and bytes.

Each case is sent to the fake Ollama directly and through the proxy; the answers must match
once the fake's own clock (created_at, created, expires_at, Date) is masked out.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from conftest import StartProxy
from fake_ollama import FakeOllama, RequestRecord, Scenario
from helpers import RunningProxy, raw_request
from ollama_metrics.ollama.wire import route


def _last(fake: FakeOllama, path: str) -> RequestRecord:
    """The last request the fake got on `path`: with several workers, the main process polls
    /api/ps (and /api/tags) meanwhile, so the very last one may be the poller's."""
    return next(r for r in reversed(fake.requests) if r.path_qs.split("?")[0] == path)


@pytest.fixture
async def proxy(fake: FakeOllama, start_any: StartProxy) -> RunningProxy:
    """Each test here also runs through `serve --workers 2` (conftest.start_any)."""
    return await start_any(fake.url)

_CLOCK = re.compile(rb'"(created_at|created|expires_at|modified_at)":("[^"]*"|\d+)|chatcmpl-\d+|'
                    rb'cmpl-\d+')
_IGNORED_HEADERS = {"date"}

CHAT = b'{"model":"llama3.2","messages":[{"role":"user","content":"Why is the sky blue?"}]}'
CASES: list[tuple[str, str, bytes | None]] = [
    ("GET", "/", None),
    ("HEAD", "/", None),
    ("GET", "/api/version", None),
    ("HEAD", "/api/version", None),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("POST", "/api/show", b'{"model":"llama3.2"}'),
    ("POST", "/api/show", b'{"model":"nope"}'),
    ("POST", "/api/copy", b'{"source":"llama3.2","destination":"copy"}'),
    ("DELETE", "/api/delete", b'{"model":"nope"}'),  # 404 (each case has a fresh fake)
    ("POST", "/api/generate", b'{"model":"llama3.2","prompt":"Why is the sky blue?"}'),
    ("POST", "/api/generate", b'{"model":"llama3.2","prompt":"hi","stream":false}'),
    ("POST", "/api/generate", b'{"model":"llama3.2","prompt":""}'),  # load only
    ("POST", "/api/generate", b'{"model":"nope","prompt":"hi"}'),
    ("POST", "/api/generate", b'{"model":"llama3.2",'),  # bad JSON
    ("POST", "/api/generate", b""),  # empty body
    ("POST", "/api/chat", CHAT),
    ("POST", "/api/chat", CHAT[:-1] + b',"stream":false}'),
    ("POST", "/api/embed", b'{"model":"all-minilm","input":["a","b"]}'),
    ("POST", "/api/embeddings", b'{"model":"all-minilm","prompt":"a"}'),
    ("POST", "/api/pull", b'{"model":"llama3.2"}'),
    ("POST", "/api/pull", b'{"model":"llama3.2","stream":false}'),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/chat/completions", CHAT[:-1] + b',"stream":true}'),
    ("POST", "/v1/chat/completions",
     CHAT[:-1] + b',"stream":true,"stream_options":{"include_usage":true}}'),
    ("POST", "/v1/completions", b'{"model":"llama3.2","prompt":"hi","stream":true}'),
    ("POST", "/v1/embeddings", b'{"model":"all-minilm","input":"a"}'),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/llama3.2:latest", None),
    ("GET", "/api/tags?x=1&y=%2F", None),
    ("GET", "/no/such/route", None),
    ("GET", "/api/generate", None),  # wrong method: 405
    ("POST", "/metrics", b"{}"),  # only GET /metrics is the proxy's own
]


async def _fetch(http: aiohttp.ClientSession, base: str, method: str, path: str,
                 body: bytes | None) -> tuple[int, str, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    async with http.request(method, base + path, data=body, headers=headers) as resp:
        data = await resp.read()
        kept = {k.lower(): v for k, v in resp.headers.items() if k.lower() not in _IGNORED_HEADERS}
        assert not ("content-length" in kept and "transfer-encoding" in kept)
        if "content-length" in kept and method != "HEAD":
            # The fake's timestamps vary in length; the declared length must fit the bytes.
            assert int(kept.pop("content-length")) == len(data)
            kept["content-length"] = "<len>"
        return resp.status, resp.reason or "", kept, _CLOCK.sub(b"<clock>", data)


@pytest.mark.parametrize(("method", "path", "body"), CASES,
                         ids=[f"{m} {p} {(b or b'')[:40]!r}" for m, p, b in CASES])
async def test_same_answer_direct_and_through_proxy(
    fake: FakeOllama, proxy: RunningProxy, http: aiohttp.ClientSession,
    method: str, path: str, body: bytes | None,
) -> None:
    direct = await _fetch(http, fake.url, method, path, body)
    proxied = await _fetch(http, proxy.url, method, path, body)
    assert proxied == direct


async def test_delete_with_body(fake: FakeOllama, proxy: RunningProxy,
                                http: aiohttp.ClientSession) -> None:
    async with http.post(proxy.url + "/api/copy",
                         data=b'{"source":"llama3.2","destination":"mine"}') as resp:
        assert resp.status == 200
    async with http.delete(proxy.url + "/api/delete", data=b'{"model":"mine"}') as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    record = _last(fake, "/api/delete")
    assert (record.method, record.path_qs, record.body) == ("DELETE", "/api/delete",
                                                            b'{"model":"mine"}')


async def test_no_server_header_of_its_own(proxy: RunningProxy,
                                           http: aiohttp.ClientSession) -> None:
    for path in ("/", "/api/tags", "/metrics", "/test"):
        async with http.get(proxy.url + path) as resp:
            assert "Server" not in resp.headers, path


async def test_streams_default_by_route(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    body = b'{"model":"llama3.2","prompt":"hi"}'
    async with http.post(proxy.url + "/api/generate", data=body) as resp:
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        assert "Content-Length" not in resp.headers
        assert resp.headers["Transfer-Encoding"] == "chunked"
    async with http.post(proxy.url + "/v1/chat/completions", data=CHAT) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")


async def test_host_rewritten_origin_kept(fake: FakeOllama, proxy: RunningProxy,
                                          start_proxy: StartProxy,
                                          http: aiohttp.ClientSession) -> None:
    # Reaching a proxy that listens beyond loopback by a LAN name must not trip Ollama's
    # loopback Host check...
    lan = {"Host": "gpu-box.example.com:11434"}
    async with http.get(fake.url + "/api/tags", headers=lan) as resp:
        assert resp.status == 403  # the fake, like Ollama, refuses that Host directly
    wide = await start_proxy(fake.url, listen="0.0.0.0:0")
    async with http.get(wide.url + "/api/tags", headers=lan) as resp:
        assert resp.status == 200
    assert _last(fake, "/api/tags").headers["Host"] == fake.url.removeprefix("http://")
    # ...while on loopback the proxy refuses it itself, as Ollama would (test_hosts.py).
    async with http.get(proxy.url + "/api/tags", headers=lan) as resp:
        assert (resp.status, await resp.read()) == (403, b"")
    # ...while Origin reaches Ollama unchanged, so its CORS verdict (an empty 403) is relayed.
    async with http.get(proxy.url + "/api/tags", headers={"Origin": "http://evil.example"}) as r:
        assert (r.status, await r.read()) == (403, b"")
    assert _last(fake, "/api/tags").headers["Origin"] == "http://evil.example"


async def test_hop_by_hop_dropped_end_to_end_kept(fake: FakeOllama, proxy: RunningProxy) -> None:
    body = b'{"model":"llama3.2","prompt":"hi","stream":false}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    request = (
        b"POST /api/generate?ts=1700000000&insecure=true HTTP/1.1\r\n"
        b"Host: localhost\r\nConnection: keep-alive, X-Foo\r\nX-Foo: secret\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n"
        b"Authorization: Bearer tok\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked
    )
    reply = await raw_request(proxy.port, request, timeout=1.0)
    head, _, _ = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    lower = head.lower()
    assert not (b"\r\ncontent-length:" in lower and b"\r\ntransfer-encoding:" in lower)
    seen = _last(fake, "/api/generate")
    names = {k.lower() for k in seen.headers}
    assert not names & {"connection", "x-foo", "keep-alive", "te", "proxy-authorization"}
    assert seen.headers["Authorization"] == "Bearer tok"
    assert seen.path_qs == "/api/generate?ts=1700000000&insecure=true"
    assert seen.body == body


async def test_gzip_reply_relayed_as_sent(fake: FakeOllama, proxy: RunningProxy,
                                          http: aiohttp.ClientSession) -> None:
    fake.scenarios["zipped:latest"] = Scenario(gzip=True)
    body = b'{"model":"zipped","prompt":"hi","stream":false}'
    hdrs = {"Accept-Encoding": "gzip"}
    async with http.post(fake.url + "/api/generate", data=body, headers=hdrs) as resp:
        direct = (resp.headers.get("Content-Encoding"), await resp.read())
    async with http.post(proxy.url + "/api/generate", data=body, headers=hdrs) as resp:
        proxied = (resp.headers.get("Content-Encoding"), await resp.read())
    assert direct[0] == proxied[0] == "gzip"
    assert gzip.decompress(proxied[1]).startswith(b'{"model":"zipped"')


async def test_blob_upload_streams_and_head_passes(fake: FakeOllama, proxy: RunningProxy,
                                                   http: aiohttp.ClientSession) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    count = 16
    digest = hashlib.sha256(chunk * count).hexdigest()
    path = f"/api/blobs/sha256:{digest}"

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk
            await asyncio.sleep(0)

    async with http.head(proxy.url + path) as resp:
        assert resp.status == 404
    async with http.post(proxy.url + path, data=body(),
                         headers={"Content-Length": str(len(chunk) * count)}) as resp:
        assert resp.status == 201
    seen = _last(fake, path)
    assert seen.path_qs == path
    assert seen.headers.get("Content-Length") == str(len(chunk) * count)  # not re-chunked
    async with http.head(proxy.url + path) as resp:
        assert resp.status == 200
    assert proxy.sample("ollama_requests_total", model="none", endpoint="/api/blobs/:digest",
                        status="success", prompt_category="other") == 2


@pytest.mark.parametrize(("path", "template"), [
    ("/api/blobs/sha256:abc", "/api/blobs/:digest"),
    ("/v1/models/llama3.2:latest", "/v1/models/:model"),
    ("/api/chat", "/api/chat"),
    ("/api/chat/", "other"),
    ("/api/blobs/", "other"),
    ("/random/junk", "other"),
])
def test_route_templates(path: str, template: str) -> None:
    assert route(path)[0] == template
