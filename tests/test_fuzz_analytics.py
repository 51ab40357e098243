"""Fuzzing the analytics and dashboard routes through the running app: whatever the query
string and headers hold, the answer is a 2xx, 3xx or a 4xx with a reason, never a 500, a
dropped connection or a traceback in the log.

Requests are written as raw bytes on a real socket, so a query can hold any byte, percent-
encoded or as it came (when the HTTP parser lets it through). The store is the seeded SQLite one
of test_analytics_api.py, behind a token, so every route answers past its guard. The Hypothesis
profile (derandomized, see test_fuzz.py) is loaded there; examples are bounded per route.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_fuzz  # noqa: F401  (registers and loads the Hypothesis profile)
from analytics_helpers import DATA, T0, _seed
from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import RunningProxy, raw_request
from ollama_metrics.analytics.query import MAX_SEARCH_CHARS, MAX_SEARCH_TERMS, STATUSES
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.observe.categorize import CATEGORIES

pytestmark = [
    pytest.mark.slow(reason="Hypothesis against the running app"),
    pytest.mark.filterwarnings(
        "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"),
]

TOKEN = "s3cret-token"
# Requests per route: 150 in the quick, derandomized profile (the file takes ~15 s on a quiet
# machine); HYPOTHESIS_PROFILE=explore searches with its own, larger number.
EXAMPLES = (150 if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci"
            else settings().max_examples)
SEARCH = ["start_time", "end_time", "since", "model", "prompt_search", "q", "prompt_category",
          "category", "status", "endpoint", "limit", "offset", "cursor", "order", "format"]
ROUTES: dict[str, list[str]] = {
    "/analytics/search": SEARCH,
    "/analytics/messages": SEARCH,
    "/analytics/messages/{id}": [],
    "/analytics/models": SEARCH,
    "/analytics/stats": SEARCH,
    "/analytics/timeseries": [*SEARCH, "step"],
    "/analytics/export": SEARCH,
    "/analytics/live": ["recent"],
    "/analytics/loaded": [],
    "/analytics": ["token"],
    "/analytics/static/app.css": [],
    "/dashboard": ["token"],
}

digits = st.text("0123456789", min_size=1, max_size=400)
numbers = st.one_of(
    st.integers().map(str), st.floats().map(repr), digits,
    st.builds(lambda d, e: f"{d}e{e}", digits, st.integers(-400, 400)),
    st.sampled_from(["nan", "inf", "-inf", "-0", "1_000", " 5 ", "0x10", "١٢", "9" * 400]),
    st.builds(lambda n, u: f"{n}{u}", st.one_of(digits, st.floats(0).map(repr)),
              st.sampled_from(["s", "m", "h", "d", "w", "y", ""])),
    st.builds(lambda n: str(T0 + n), st.integers(-100, 100)),
)
words = st.one_of(
    st.sampled_from([*CATEGORIES, *STATUSES, "time", "rank", "csv", "jsonl", "llama3.2",
                     "qwen3", "/api/chat", TOKEN, "number", '"number 7"', "sea*", "a OR b",
                     "NEAR(a b)", "*", "^x", "x:y", "\"", "(", "-x"]),
    st.text(max_size=30),
)
values = st.one_of(numbers, words)
raw_bytes = st.binary(max_size=30)  # percent-encoded as they are: invalid UTF-8 included


def _encode(part: str | bytes) -> str:
    return urllib.parse.quote(part, safe="")


@st.composite
def queries(draw: st.DrawFn, names: list[str]) -> str:
    """A query string: known names (or any), each with a plausible or arbitrary value."""
    name = st.sampled_from(names) | st.text(max_size=8) if names else st.text(max_size=8)
    pairs = draw(st.lists(st.tuples(name, values | raw_bytes), max_size=5))
    query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in pairs)
    if draw(st.integers(0, 9)) == 0:  # now and then a piece of raw, unencoded query
        query += draw(st.text(st.characters(codec="ascii", exclude_characters="\r\n #"),
                              max_size=10))
    return query


# Header values: any byte the HTTP parser may let through (obs-text included).
header_value = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
HEADERS = ["Accept", "Accept-Encoding", "If-None-Match", "Range", "User-Agent", "Referer",
           "X-Forwarded-For", "Content-Type", "Origin", "Cookie"]


async def _ask(proxy: RunningProxy, target: str, headers: list[tuple[str, bytes]],
               caplog: pytest.LogCaptureFixture) -> int:
    caplog.clear()
    head = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers)
    request = (b"GET " + target.encode() + b" HTTP/1.1\r\nHost: localhost\r\n" + head
               + b"Connection: close\r\n\r\n")
    reply = await raw_request(proxy.port, request)
    assert reply.startswith(b"HTTP/1."), (target, headers, reply[:200])  # not dropped
    status = int(reply.split(b" ", 2)[1])
    assert status < 500, (target, headers, reply[:500])
    if status >= 400 and status != 404:
        assert reply.partition(b"\r\n\r\n")[2], (target, "a 4xx gives its reason")
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, (target, [r.getMessage() for r in loud])
    assert "Traceback" not in caplog.text
    return status


@pytest.fixture
async def api(fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path) -> RunningProxy:
    await _seed(tmp_path, DATA)
    return await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_token=TOKEN, analytics_retention_days=0))


AUTH = ("Authorization", f"Bearer {TOKEN}".encode())


@pytest.mark.parametrize("path", list(ROUTES))
@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_no_query_or_header_makes_a_server_error(
        api: RunningProxy, caplog: pytest.LogCaptureFixture, path: str, data: st.DataObject,
) -> None:
    query = data.draw(queries(ROUTES[path]), "query")
    if "{id}" in path:  # an id of any bytes, percent-encoded (a `/` included)
        path = path.format(id=_encode(data.draw(st.just("rec00001") | values | raw_bytes,
                                                "id")) or "x")
    headers = data.draw(st.lists(st.tuples(st.sampled_from(HEADERS), header_value),
                                 max_size=3), "headers")
    await _ask(api, f"{path}?{query}" if query else path, [AUTH, *headers], caplog)


credentials = st.one_of(
    st.tuples(st.just("Authorization"), st.one_of(
        header_value, st.builds(lambda scheme, rest: scheme + b" " + rest,
                                st.sampled_from([b"Bearer", b"bearer", b"Basic"]), header_value),
        st.just(b"Bearer \xff\xfe"))),
    st.tuples(st.just("Cookie"), st.one_of(
        header_value, st.builds(lambda v: b"ollama_metrics_token=" + v, header_value),
        st.just(b"ollama_metrics_token=\xff\xfe"))),
)


@pytest.mark.parametrize("path", ["/analytics/search", "/analytics"])
@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_no_credentials_make_a_server_error(
        api: RunningProxy, caplog: pytest.LogCaptureFixture, path: str, data: st.DataObject,
) -> None:
    headers = data.draw(st.lists(credentials, min_size=1, max_size=2), "credentials")
    assert await _ask(api, path, headers, caplog) in (200, 400, 401)  # 400: the HTTP parser


# Found before: a `since` too long for a float (its start became -inf: OverflowError, 500, or a
# search from -inf), and a query that decodes to a control character (the redirect's Location
# header: connection dropped).
@pytest.mark.parametrize(("target", "expected"), [
    ("/analytics/timeseries?since=" + "9" * 400, 400),
    ("/analytics/search?since=" + "9" * 400 + "w", 400),
    ("/analytics/search?since=100000w", 400),
    ("/analytics/timeseries?start_time=0&end_time=" + "9" * 300, 400),
    ("/analytics/timeseries?end_time=1e308", 400),
    ("/dashboard?%0a", 302),
    ("/dashboard?token=%0d%0aSet-Cookie:%20x=y", 302),
], ids=["since-inf", "since-inf-weeks", "since-before-1970", "end-1e300", "end-1e308",
        "dashboard-newline", "dashboard-crlf"])
async def test_found_before(api: RunningProxy, caplog: pytest.LogCaptureFixture,
                            target: str, expected: int) -> None:
    assert await _ask(api, target, [AUTH], caplog) == expected


# Plain input means literal words (issue 15): any printable text within the search budget is a
# search that answers 200 on every route that searches, operators and stray quotes included.
search_text = st.text(st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S", "Zs"]),
                      max_size=80).filter(lambda t: t.strip() and "\x00" not in t)


@pytest.mark.parametrize("path", ["/analytics/search", "/analytics/stats"])
@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(search_text, st.lists(st.one_of(words, search_text), max_size=6).map(
    " ".join)).filter(lambda t: t.strip() and len(t) <= MAX_SEARCH_CHARS and t.isprintable()),
       order=st.sampled_from(["time", "rank"]))
async def test_any_printable_search_text_answers_200(
        api: RunningProxy, caplog: pytest.LogCaptureFixture, path: str, text: str,
        order: str) -> None:
    if len(re.findall(r"\w+", text)) > MAX_SEARCH_TERMS:
        return
    target = f"{path}?prompt_search={_encode(text)}&order={order}"
    assert await _ask(api, target, [AUTH], caplog) == 200, text
