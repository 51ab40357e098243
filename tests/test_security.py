"""Security: the token guards every analytics route, search values never become SQL, static
files never leave their directory, and prompt text never reaches the log at INFO."""

from __future__ import annotations

import base64
import contextlib
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from analytics_helpers import DATA, _seed
from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import RunningProxy, fake_process, proxy_process, raw_request
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.dashboard.routes import static_files
from wire import parse_replies

TOKEN = "s3cret-token"


@pytest.fixture
async def guarded(fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path) -> RunningProxy:
    await _seed(tmp_path, DATA)
    return await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_token=TOKEN, analytics_retention_days=0))


def _analytics_paths(proxy: RunningProxy) -> list[str]:
    """Every route the app serves under /analytics but the static files, parameters filled."""
    paths = []
    for resource in proxy.app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter") or ""
        if path.startswith("/analytics") and not path.startswith("/analytics/static/"):
            paths.append(path.replace("{id}", "rec00001"))
    return sorted(set(paths))


async def test_every_analytics_route_needs_the_token(guarded: RunningProxy,
                                                     http: aiohttp.ClientSession) -> None:
    paths = _analytics_paths(guarded)
    assert {"/analytics", "/analytics/search", "/analytics/live",
            "/analytics/messages/rec00001"} <= set(paths)  # the list is what the app serves
    for path in paths:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Cookie": "ollama_metrics_token=forged"}):
            async with http.get(guarded.url + path, headers=headers,
                                allow_redirects=False) as resp:
                assert resp.status == 401, (path, headers)
        async with http.get(guarded.url + path, allow_redirects=False,
                            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status != 401, path
    async with http.get(guarded.url + "/analytics", params={"token": "wrong"},
                        allow_redirects=False) as resp:
        assert resp.status == 401
        assert "set-cookie" not in {k.lower() for k in resp.headers}


# Bytes that are no UTF-8 (aiohttp hands them on surrogate-escaped), where a credential goes.
MALFORMED = [b"Authorization: Bearer \xff\xfe", b"Authorization: \xff\xfe",
             b"Authorization: Bearer " + TOKEN.encode() + b"\xff",
             b"Cookie: ollama_metrics_token=\xff\xfe", b"Cookie: \xff\xfe",
             b"Cookie: a=\xff; ollama_metrics_token=\xc3(", b"Cookie: ollama_metrics_token"]


async def test_malformed_credential_bytes_are_refused_not_an_error(
    fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path,
) -> None:
    """401 on every guarded route, never a 500 (no traceback: the autouse check)."""
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_token=TOKEN, analytics_protect_metrics=True))
    for path in ("/analytics/search", "/analytics/stats", "/analytics/live", "/analytics",
                 "/metrics"):
        for header in MALFORMED:
            (reply,) = parse_replies(await raw_request(
                proxy.port, b"GET %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n"
                            b"Connection: close\r\n\r\n" % (path.encode(), header)))
            assert reply.status == 401, (path, header)


async def test_the_bearer_scheme_is_case_insensitive(guarded: RunningProxy,
                                                     http: aiohttp.ClientSession) -> None:
    for value in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"BeArEr {TOKEN}", f"Bearer  {TOKEN}"):
        async with http.get(guarded.url + "/analytics/stats",
                            headers={"Authorization": value}) as resp:
            assert resp.status == 200, value
    for value in ("Bearer", "Bearer ", f"Bearer{TOKEN}", f"Basic {TOKEN}", f"Token {TOKEN}",
                  f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN.upper()}",
                  f"Bearer {TOKEN} {TOKEN}"):
        async with http.get(guarded.url + "/analytics/stats",
                            headers={"Authorization": value}) as resp:
            assert resp.status == 401, value


# Every quote between two other characters: bound, SQLite's trace shows the value with its
# quotes doubled, so the value as sent only appears in a statement if it was pasted into the SQL.
INJECTIONS = ["x' OR '1'='1", "x') OR 1=1 --", "llama3.2' UNION SELECT * FROM sqlite_master --",
              "\"; DROP TABLE interactions; --'x"]
PARAMETERS = ["model", "endpoint", "prompt_search", "prompt_category", "status", "since",
              "order", "start_time", "end_time", "limit", "offset", "cursor"]


async def test_search_values_are_never_interpolated_into_sql(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db: sqlite3.Connection = connect(*args, **kwargs)
        db.set_trace_callback(statements.append)
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)  # every connection the store opens
    await _seed(tmp_path, DATA)
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_retention_days=0))
    for evil in INJECTIONS:
        for route in ("/analytics/search", "/analytics/stats", "/analytics/export",
                      "/analytics/timeseries", "/analytics/models"):
            for name in PARAMETERS:
                async with http.get(proxy.url + route, params={name: evil}) as resp:
                    assert resp.status in (200, 400), (route, name, await resp.text())
        async with http.get(proxy.url + "/analytics/messages/" + evil) as resp:
            assert resp.status in (400, 404)
    assert statements
    for evil in INJECTIONS:
        pasted = [s for s in statements if evil in s]
        assert not pasted, pasted[:3]
        assert any(evil.replace("'", "''") in s for s in statements)  # it was bound, and traced
    async with http.get(proxy.url + "/analytics/search", params={"limit": "1000"}) as resp:
        assert len((await resp.json())["results"]) == len(DATA)  # nothing was changed


TRAVERSALS = [
    "/analytics/static/../../../../../etc/passwd",
    "/analytics/static/%2e%2e/%2e%2e/routes.py",
    "/analytics/static/..%2f..%2froutes.py",
    "/analytics/static/%2e%2e%2f%2e%2e%2f__init__.py",
    "/analytics/static/vendor/../../routes.py",
    "/analytics/static//etc/passwd",
    "/analytics/static/%2fetc%2fpasswd",
    "/analytics/static/..\\..\\routes.py",
    "/analytics/static/..%5c..%5croutes.py",
    "/analytics/static/app.css%00.py",
    "/analytics/static/./../routes.py",
    "/analytics/static/%252e%252e/routes.py",
]


async def test_static_files_never_leave_their_directory(guarded: RunningProxy) -> None:
    files = static_files()
    sources = [p.read_bytes() for p in Path(__file__).parents[1].glob("src/ollama_metrics/**/*.py")]
    passwd = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").exists() else b"root:x:"
    (ok,) = parse_replies(await raw_request(guarded.port, b"GET /analytics/static/app.css "
                                            b"HTTP/1.1\r\nHost: localhost\r\n"
                                            b"Connection: close\r\n\r\n"))
    assert (ok.status, ok.body) == (200, files["app.css"].body)  # the route does serve files
    for path in TRAVERSALS:
        raw = await raw_request(guarded.port, b"GET %s HTTP/1.1\r\nHost: localhost\r\n"
                                              b"Connection: close"
                                b"\r\n\r\n" % path.encode(), timeout=2.0)
        (reply,) = parse_replies(raw)
        assert reply.status in (400, 404), (path, reply.status)
        assert reply.body not in sources and passwd[:20] not in reply.body, path
        assert b"import " not in reply.body, path


MARKER = "PRIVATE-WORDS-7f3a"


@pytest.mark.slow(reason="a proxy process")
async def test_prompt_text_never_in_the_log_at_info(tmp_path: Path) -> None:
    """Every path that logs, with prompts that carry MARKER: Ollama errors and cut replies,
    an unreachable Ollama, clients that leave, a store that cannot be written, and requests
    too broken to parse whose bytes are the prompt."""
    prompt = f'{{"model":"%s","prompt":"{MARKER} please"}}'
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{refused.getsockname()[1]}"
    scenarios = ('{"dies:latest":{"drop_after":1},"broken:latest":{"error_before":[500,'
                 '"' + MARKER + ' in an error"]},"slow:latest":{"tokens":["a","b","c"],'
                 '"token_delay":0.2},"llama3.2:latest":{}}')
    try:
        with fake_process("--scenarios", scenarios) as fake, \
                proxy_process(fake.url, "--analytics-dir", str(tmp_path),
                              "--analytics-backend", "sqlite,loki",
                              "--analytics-loki-url", dead,
                              "--analytics-drain-grace", "1") as proxy, \
                proxy_process(dead, "--analytics-backend", "none") as orphan:
            async with aiohttp.ClientSession() as http:
                for model in ("llama3.2", "dies", "broken", "missing"):
                    async with http.post(proxy.url + "/api/generate",
                                         data=(prompt % model).encode()) as resp:
                        with contextlib.suppress(aiohttp.ClientPayloadError):
                            await resp.read()
                async with http.post(orphan.url + "/api/generate",
                                     data=(prompt % "llama3.2").encode()) as resp:
                    assert resp.status == 502
                resp = await http.post(proxy.url + "/api/generate",
                                       data=(prompt % "slow").encode())
                await resp.content.readline()
                resp.close()  # a client that leaves mid-stream
            for broken in (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: "
                           b"chunked\r\n\r\n" + MARKER.encode() + b"\r\n\r\n",
                           b"POST /api/generate?" + MARKER.encode() + b" HTTP/1.1 x\r\n\r\n",
                           b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\n"
                           b"X-Prompt: " + MARKER.encode()
                           + b"\x00\r\n\r\n"):
                for port in (proxy.port, orphan.port):
                    assert (await raw_request(port, broken, timeout=1.0)).startswith(
                        b"HTTP/1.")
            logs: Callable[[], str] = lambda: proxy.output + orphan.output  # noqa: E731
    finally:
        refused.close()
    assert "WARNING" in logs()  # the failures above were logged...
    assert MARKER not in logs()  # ...without the prompt


# --- upstream credentials ----------------------------------------------------------------------

CREDENTIALS = "gateway-user:pw-s3cret"


def _with_credentials(url: str) -> str:
    return url.replace("http://", f"http://{CREDENTIALS}@", 1)


async def test_upstream_credentials_are_used_not_shown(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client's own Authorization (the openai SDK sends one) still goes through: the
    configured credentials replace it towards the upstream. They never appear in the proxy's
    replies or log, masked as user:***@."""
    import openai

    proxy = await start_proxy(_with_credentials(fake.url))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0)
    reply = await client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert reply.choices[0].message.content == "Hello, world!"
    sent = fake.requests[-1].headers
    expected = "Basic " + base64.b64encode(CREDENTIALS.encode()).decode()
    assert {k.lower(): v for k, v in sent.items()}["authorization"] == expected
    async with http.get(proxy.url + "/test") as resp:
        shown = (await resp.json())["upstream"]["url"]
    assert shown.startswith("http://gateway-user:***@127.0.0.1:")

    with socket.socket() as refused:
        refused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        down = await start_proxy(_with_credentials(f"http://127.0.0.1:{refused.getsockname()[1]}"))
        for path in ("/api/generate", "/v1/chat/completions"):
            async with http.post(down.url + path, data=b'{"model":"m"}') as resp:
                body = await resp.text()
            assert resp.status == 502 and "gateway-user:***@" in body, body
    assert "pw-s3cret" not in body + caplog.text
    assert "gateway-user:***@" in caplog.text


@pytest.mark.slow(reason="a proxy process")
def test_upstream_credentials_stay_out_of_the_start_log() -> None:
    with socket.socket() as refused:
        refused.bind(("127.0.0.1", 0))
        port = refused.getsockname()[1]
        with proxy_process(_with_credentials(f"http://127.0.0.1:{port}")) as proxy:
            warning = proxy.wait_for("Ollama is not answering").string
    assert "pw-s3cret" not in proxy.output
    assert "gateway-user:***@" in proxy.output
    assert f"OLLAMA_HOST=127.0.0.1:{port} ollama serve" in warning
