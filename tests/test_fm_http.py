"""Failure modes 9-13, 15 and 22: what goes over the wire -- Origin and Host, hop-by-hop
headers and framing, gzip, big JSON bodies, a 1 GiB blob upload, malformed bodies and unknown
paths, smuggling and parser probes.

Part of the 25 failure modes of shared/reference/failure-modes.md, each a test against the
real proxy, `test_fmNN_…`, its docstring quoting the expected behaviour (fm_helpers.py says
how they are run and time-scaled).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import random
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from fm_helpers import _fake_requests, _post, _search
from helpers import (
    RunningProxy,
    fake_process,
    proxy_process,
    raw_request,
)
from wire import MIB, Watch, mask_clock, parse_replies, startup_done

# --- 9. Origin and Host -------------------------------------------------------------------------

async def test_fm09_origin_forwarded_host_rewritten(fake: FakeOllama, proxy: RunningProxy,
                                                    start_proxy: StartProxy,
                                                    http: aiohttp.ClientSession) -> None:
    """Request with `Origin: http://evil` ⇒ forwarded unchanged, mock's 403 relayed; mock asserts
    `Host` equals the upstream authority. A LAN name reaches a proxy listening beyond loopback
    (on loopback the proxy refuses it itself, as Ollama would: test_hosts.py)."""
    async with http.post(proxy.url + "/api/generate", data=b'{"model":"llama3.2","prompt":"x"}',
                         headers={"Origin": "http://evil"}) as resp:
        assert (resp.status, await resp.read()) == (403, b"")
    (seen,) = [r for r in fake.requests if r.path_qs == "/api/generate"]
    assert seen.headers["Origin"] == "http://evil"
    assert seen.headers["Host"] == fake.url.removeprefix("http://")
    lan = await start_proxy(fake.url, listen="0.0.0.0:0")
    async with http.get(lan.url + "/api/tags?lan", headers={"Host": "gpu-box.lan:11434"}) as r:
        assert r.status == 200  # a LAN name at the proxy is no Host Ollama refuses
    (seen,) = [r for r in fake.requests if r.path_qs == "/api/tags?lan"]
    assert seen.headers["Host"] == fake.url.removeprefix("http://")


# --- 10. Hop-by-hop headers and framing ---------------------------------------------------------

async def test_fm10_hop_by_hop_and_framing(fake: FakeOllama, proxy: RunningProxy) -> None:
    """Client sends `Connection: keep-alive, X-Foo`, `Keep-Alive`, `TE`, chunked request body ⇒
    mock never sees hop-by-hop headers, body intact; response never carries both
    `Content-Length` and `Transfer-Encoding`; declared length == bytes sent."""
    body = b'{"model":"llama3.2","prompt":"hi","stream":false}'
    chunked = b"10\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (body[:16], len(body) - 16, body[16:])
    requests = [
        ("POST", b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n"
                 b"Connection: keep-alive, X-Foo\r\nX-Foo: secret\r\nKeep-Alive: timeout=5\r\n"
                 b"TE: trailers\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked),
        ("POST", _post("/api/generate", b'{"model":"llama3.2","prompt":"hi"}')),  # a stream
        ("HEAD", b"HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        ("GET", b"GET /no/such/route HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        ("POST", _post("/api/copy", b'{"source":"llama3.2","destination":"mine"}')),
        ("DELETE", b"DELETE /api/delete HTTP/1.1\r\nHost: localhost\r\nContent-Length: 16\r\n"
                   b"Connection: close\r\n\r\n{\"model\":\"mine\"}"),
    ]
    raw = await raw_request(proxy.port, b"".join(r for _, r in requests), timeout=3.0)
    methods = [m for m, _ in requests]
    replies = parse_replies(raw, methods)
    assert [r.status for r in replies] == [200, 200, 200, 404, 200, 200]
    for method, reply in zip(methods, replies, strict=True):
        assert not (reply.has("Content-Length") and reply.has("Transfer-Encoding"))
        assert reply.complete
        if reply.length is not None and method != "HEAD":  # HEAD declares a length, sends none
            assert len(reply.body) == reply.length
    assert replies[1].chunked
    seen = next(r for r in fake.requests if r.path_qs == "/api/generate")
    assert seen.body == body
    assert not {k.lower() for k in seen.headers} & {
        "connection", "x-foo", "keep-alive", "te", "upgrade", "transfer-encoding"}


# --- 11. gzip -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
async def test_fm11_gzip_reply_decodes_with_its_header(
    fake: FakeOllama, proxy: RunningProxy, stream: bool,
) -> None:
    """Mock replies `Content-Encoding: gzip` ⇒ client body decodes with the header it receives
    (compressed+header or plain+no header, never plain+gzip header)."""
    fake.scenarios["zipped:latest"] = Scenario(gzip=True)
    body = orjson.dumps({"model": "zipped", "prompt": "hi", "stream": stream})
    raw = await raw_request(proxy.port, _post("/api/generate", body, b"Accept-Encoding: gzip\r\n",
                                              b"Connection: close\r\n"), timeout=2.0)
    (reply,) = parse_replies(raw)
    assert reply.complete and reply.header("Content-Encoding") == "gzip"
    assert reply.body[:2] == b"\x1f\x8b"  # what it says: gzip
    lines = zlib.decompressobj(wbits=31).decompress(reply.body).splitlines()
    assert orjson.loads(lines[-1])["done"] is True
    assert len(lines) == (5 if stream else 1)
    async with aiohttp.ClientSession() as decoding, decoding.post(  # decodes as told
            proxy.url + "/api/generate", data=body) as resp:
        text = await resp.read()
    assert orjson.loads(text.splitlines()[-1])["done"] is True
    assert gzip.decompress(reply.body) == zlib.decompressobj(wbits=31).decompress(reply.body)


# --- 12. Big JSON ---------------------------------------------------------------------------------

@pytest.mark.slow(reason="a 20 MB body through a proxy process")
async def test_fm12_big_json_with_images(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """20 MB `/api/chat` with base64 `images` ⇒ 200 (no 413), proxy RSS rise < 3x body, stored
    row holds image count/size/hash, not base64; stored text truncated to the configured cap."""
    image = random.Random(12).randbytes(15 * MIB)
    b64 = base64.b64encode(image).decode()
    text = "Describe this picture, please, in detail. " * 250  # beyond the 1000-char cap
    body = orjson.dumps({"model": "llama3.2", "stream": False, "messages": [
        {"role": "user", "content": text, "images": [b64]}]})
    assert len(body) > 20 * 10**6
    with fake_process() as fake, proxy_process(fake.url, "--analytics-dir", str(tmp_path),
                                               "--analytics-max-text", "1000") as proxy:
        watch = Watch(proxy.proc.pid).start()
        try:
            async with http.post(proxy.url + "/api/chat", data=io.BytesIO(body)) as resp:
                assert resp.status == 200
                assert (await resp.json())["done"] is True
            (row,) = await _search(http, proxy.url, 1)
        finally:
            rise = watch.stop()
    print(f"proxy RSS rise {rise:.1f} MiB for a {len(body) / MIB:.1f} MiB body")
    assert rise < 3 * len(body) / MIB
    assert row["image_count"] == 1
    assert row["images"] == [{"bytes": len(image), "sha256": hashlib.sha256(image).hexdigest()}]
    assert b64[:64] not in orjson.dumps(row).decode()
    assert row["truncated"] is True
    assert row["prompt"] == text[:1000] + " …[truncated]"
    assert row["request_bytes"] == len(body)


# --- 13. Blob upload --------------------------------------------------------------------------

@pytest.mark.slow(reason="1 GiB uploaded through a proxy process")
async def test_fm13_one_gigabyte_blob_upload(tmp_path: Path) -> None:
    """1 GB generated `PUT /api/blobs/sha256:<d>` ⇒ mock digest matches, proxy RSS rise < 50 MB
    (streamed), `HEAD` passes through, no body in analytics.

    Ollama's upload method is POST (a PUT is relayed too, and Ollama answers it 405)."""
    chunk, count = bytes(range(256)) * 4096, 1024  # 1 MiB, 1 GiB in all
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(chunk)
    path = f"/api/blobs/sha256:{digest.hexdigest()}"

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    with fake_process() as fake, proxy_process(fake.url, "--analytics-dir", str(tmp_path)) as proxy:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.put(proxy.url + path, data=b"x") as resp:
                assert resp.status == 405  # what Ollama answers a PUT, relayed
            async with http.head(proxy.url + path) as resp:
                assert resp.status == 404
            watch = Watch(proxy.proc.pid).start()
            try:
                async with http.post(proxy.url + path, data=body(),
                                     headers={"Content-Length": str(count * len(chunk))}) as resp:
                    assert resp.status == 201, await resp.text()  # the digest matched
            finally:
                rise = watch.stop()
            async with http.head(proxy.url + path) as resp:
                assert resp.status == 200
            rows = await _search(http, proxy.url, 4)
    print(f"proxy RSS rise {rise:.1f} MiB while streaming 1 GiB")
    assert rise < 50
    (upload,) = [r for r in rows if r["method"] == "POST"]
    assert (upload["endpoint"], upload["http_status"]) == ("/api/blobs/:digest", 201)
    assert upload["request_bytes"] == count * len(chunk)
    assert all(upload[k] is None for k in ("prompt", "response", "messages", "images"))


# --- 15. Malformed bodies and unknown paths ----------------------------------------------------

FM15_CASES: list[tuple[str, str, bytes | None]] = [
    ("POST", "/api/generate", b'{"model":'),  # truncated JSON
    ("POST", "/api/generate", b"hello, not json"),
    ("POST", "/api/generate", b""),
    ("POST", "/api/chat", random.Random(15).randbytes(4096)),  # binary
    ("POST", "/api/generate", b"[1, 2, 3]"),
    ("POST", "/api/generate", b'{"model": 5, "prompt": "x"}'),
    ("POST", "/api/generate", b"[" * 5000),  # deeper than any parser's recursion limit
    ("POST", "/api/generate", b'{"model":"llama3.2","prompt":"\xff\xfe bad utf-8"}'),
    ("POST", "/api/embed", b'{"model":"all-minilm","input":{"not":"a list"}}'),
    ("POST", "/v1/chat/completions", b'{"model":"llama3.2","messages":"not a list"}'),
    ("POST", "/no/such/path", b'{"model":"llama3.2"}'),
    ("GET", "/api/tags", b"a GET with a body"),
    ("DELETE", "/api/delete", None),
    ("PATCH", "/api/chat", b"{}"),
]


async def test_fm15_malformed_bodies_and_unknown_paths(
    fake: FakeOllama, proxy: RunningProxy, http: aiohttp.ClientSession,
) -> None:
    """Malformed / non-JSON / empty / binary bodies, unknown paths, GET with body ⇒ forwarded
    unchanged, upstream's answer relayed, proxy never 500s; labels `model="unknown"`,
    `endpoint="other"`.

    The proxy's label for a request naming no model is `none` (README, Metrics)."""
    for method, path, body in FM15_CASES:
        answers = []
        for base in (fake.url, proxy.url):
            async with http.request(method, base + path, data=body) as resp:
                answers.append((resp.status, resp.headers.get("Content-Type"),
                                mask_clock(await resp.read())))
        assert answers[1] == answers[0], (method, path, body)
        assert answers[1][0] < 500
        sent, relayed = [r for r in fake.requests if r.path_qs == path][-2:]
        assert relayed.body_sha256 == sent.body_sha256 == hashlib.sha256(body or b"").hexdigest()
    labels = {(s.labels["model"], s.labels["endpoint"])
              for m in proxy.registry.collect() if m.name == "ollama_requests"
              for s in m.samples}
    assert ("none", "other") in labels  # the unknown path
    assert {model for model, _ in labels} <= {"none", "llama3.2:latest", "all-minilm:latest"}
    assert {endpoint for _, endpoint in labels} <= {
        "/api/generate", "/api/chat", "/api/embed", "/v1/chat/completions", "/api/tags",
        "/api/delete", "other"}


# --- 22. Smuggling and parser probes ------------------------------------------------------------

FM22_PROBES = {
    "CL and TE together": b"POST /api/show HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/ps HTTP/1.1\r\n"
                          b"Host: localhost\r\n\r\n",
    "obfuscated TE": b"POST /api/show HTTP/1.1\r\nHost: localhost\r\n"
                     b"Transfer-Encoding: xchunked\r\n\r\n"
                     b"0\r\n\r\nGET /api/ps HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "LF in chunk extension": b"POST /api/show HTTP/1.1\r\nHost: localhost\r\n"
                             b"Transfer-Encoding: chunked"
                             b"\r\n\r\n2;a=\nGET /api/ps HTTP/1.1\r\n{}\r\n0\r\n\r\n",
    "header line over 64 KiB": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n"
                               b"X-Big: " + b"a" * 70_000
                               + b"\r\n\r\n",
}


@pytest.mark.slow(reason="a proxy process per probe")
@pytest.mark.parametrize("probe", FM22_PROBES)
async def test_fm22_smuggling_probes(probe: str, http: aiohttp.ClientSession) -> None:
    """Smuggling / parser probes over raw sockets: CL+TE together, obfuscated TE, LF in chunk
    extension, oversized header line (>8 KB) ⇒ 400/431, never two requests upstream, process
    survives.

    aiohttp answers 400 to all four (431 is never used). Header lines are allowed up to 64 KiB,
    so the oversized probe is 70 KB; tests/test_hostile_http.py has many more probes."""
    with fake_process() as fake, proxy_process(fake.url, "--ps-interval", "0",
                                               "--model-refresh", "3600") as proxy:
        await asyncio.to_thread(startup_done, fake.url)  # the proxy's own requests, done
        (reply,) = parse_replies(await raw_request(proxy.port, FM22_PROBES[probe], timeout=2.0))
        assert reply.status == 400
        assert await _fake_requests(http, fake.url) == []  # nothing went upstream
        async with http.get(proxy.url + "/api/version") as resp:
            assert resp.status == 200  # still serving
        assert proxy.proc.poll() is None
        assert "Traceback" not in proxy.output and " ERROR " not in proxy.output
