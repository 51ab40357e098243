"""The dashboard at /analytics: its routes over HTTP, then the page in a real headless Chromium.

HTTP: security headers, static files and nothing else (traversal attempts, raw and encoded,
are 404s), the /dashboard redirect, and the token's cookie flow. Browser: the page loads with no
console errors, shows the interactions made through the proxy, search narrows the table, the
detail view opens, a hostile prompt stays text, and screenshots land in test-artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Mapping
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import ollama
import pytest
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from analytics_helpers import records
from browser import chromium, console_errors, screenshot, viewport
from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import RunningProxy, raw_request
from ollama_metrics.analytics.api import cookie_value
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.dashboard import routes
from ollama_metrics.observe.categorize import CATEGORIES
from ollama_metrics.server.app import LIVE

pytestmark = pytest.mark.slow(reason="drives a real headless Chromium")

TOKEN = "dashboard-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
STATIC = Path(routes.__file__).parent / "static"
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


def _analytics(tmp_path: Path, token: str | None = None) -> AnalyticsConfig:
    return AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_token=token)


def _secured(headers: Mapping[str, str]) -> None:
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"


# --- HTTP ------------------------------------------------------------------------------------

async def test_page_and_static_files(fake: FakeOllama, start_proxy: StartProxy,
                                     http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path))
    for path in ("/analytics", "/analytics/"):
        async with http.get(proxy.url + path) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
            assert resp.headers["Cache-Control"] == "no-store"
            _secured(resp.headers)
            page = await resp.text()
    assert page == (STATIC / "index.html").read_text()
    files = sorted(str(p.relative_to(STATIC)) for p in STATIC.rglob("*") if p.is_file())
    assert {"app.js", "app.css", "favicon.svg", "vendor/uPlot.iife.min.js",
            "vendor/uPlot.LICENSE.txt"} <= set(files)
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8",
             ".html": "text/html; charset=utf-8"}
    for name in files:
        async with http.get(f"{proxy.url}/analytics/static/{name}") as resp:
            assert resp.status == 200, name
            assert resp.headers["Content-Type"] == types[Path(name).suffix], name
            assert resp.headers["Cache-Control"] == "no-cache"
            _secured(resp.headers)
            assert await resp.read() == (STATIC / name).read_bytes()
            etag = resp.headers["ETag"]
        async with http.get(f"{proxy.url}/analytics/static/{name}",
                            headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304, name
    # Every file the page asks for exists.
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert ref.startswith("/analytics/static/") and (STATIC / ref[18:]).is_file(), ref


class _Inline(HTMLParser):
    """Collects what a strict CSP would block: inline script and handlers, style attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script":
            self._in_script = True
            if "src" not in names:
                self.found.append("script without src")
        self.found += [f"{tag} {name}" for name in names if name.startswith("on")
                       or name == "style"]
        if tag == "style":
            self.found.append("style element")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.found.append("inline script")


def test_nothing_inline_and_no_html_from_data() -> None:
    parser = _Inline()
    parser.feed((STATIC / "index.html").read_text())
    assert parser.found == []
    for script in [STATIC / "app.js", *(STATIC / "js").glob("*.js")]:
        source = script.read_text()
        for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                      "eval(", "new Function", "setAttribute(\"on", "javascript:"):
            assert risky not in source, (script.name, risky)
    # The category filter lists exactly the categories the proxy assigns.
    listed = re.search(r"const CATEGORIES = \[([^\]]*)\]",
                       (STATIC / "js" / "interactions.js").read_text())
    assert listed is not None
    assert re.findall(r'"(\w+)"', listed.group(1)) == list(CATEGORIES)


TRAVERSALS = [
    "/analytics/static/../../config.py",
    "/analytics/static/../routes.py",
    "/analytics/static/%2e%2e/%2e%2e/config.py",
    "/analytics/static/%2E%2E/routes.py",
    "/analytics/static/..%2f..%2fconfig.py",
    "/analytics/static/%2e%2e%2f%2e%2e%2fconfig.py",
    "/analytics/static/%252e%252e%252fconfig.py",
    "/analytics/static/..%5c..%5cconfig.py",
    "/analytics/static/..\\..\\config.py",
    "/analytics/static/....//....//config.py",
    "/analytics/static/%2fetc%2fpasswd",
    "/analytics/static//etc/passwd",
    "/analytics/static/js",
    "/analytics/static/",
    "/analytics/static/vendor/",
    "/analytics/static/app.js%00.txt",
    "/analytics/static/__init__.py",
]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_nothing_outside_static_is_served(fake: FakeOllama, start_proxy: StartProxy,
                                                tmp_path: Path, path: str) -> None:
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path))
    raw = await raw_request(proxy.port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
                                        "Connection: close\r\n\r\n".encode())
    status = int(raw.split(b" ", 2)[1])
    assert status == 404, raw[:300]
    for secret in (b"frozen", b"import ", b"root:", b"def "):
        assert secret not in raw


async def test_dashboard_redirects_to_the_page(fake: FakeOllama, start_proxy: StartProxy,
                                               http: aiohttp.ClientSession,
                                               tmp_path: Path) -> None:
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path, TOKEN))
    async with http.get(proxy.url + "/dashboard", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/analytics"
    async with http.get(proxy.url + "/dashboard", params={"token": TOKEN},
                        allow_redirects=False) as resp:
        assert resp.headers["Location"] == f"/analytics?token={TOKEN}"
    # The query goes on as it came, still encoded: a decoded CR/LF cannot make a header.
    raw = await raw_request(proxy.port, b"GET /dashboard?token=a%0d%0aSet-Cookie:%20x=y%26z "
                            b"HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 302 ")
    assert b"\r\nLocation: /analytics?token=a%0d%0aSet-Cookie:%20x=y%26z\r\n" in raw


async def test_token_cookie_flow(fake: FakeOllama, start_proxy: StartProxy,
                                 tmp_path: Path) -> None:
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path, TOKEN))
    # Keeps cookies as a browser does (unsafe: for an IP address host too).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        for params in ({}, {"token": "wrong"}, {"token": ""}):
            async with browser.get(proxy.url + "/analytics", params=params,
                                   allow_redirects=False) as resp:
                assert resp.status == 401, params
                assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
                _secured(resp.headers)
                assert "/analytics?token=YOUR_TOKEN" in await resp.text()
                assert "Set-Cookie" not in resp.headers
        async with browser.get(proxy.url + "/analytics/static/app.css") as resp:
            assert resp.status == 200  # code and style, no data: open
        async with browser.get(proxy.url + "/analytics/search") as resp:
            assert resp.status == 401
            assert resp.headers["Content-Type"] == "application/json"

        async with browser.get(proxy.url + "/analytics", params={"token": TOKEN},
                               allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/analytics"  # the token leaves the address
            cookie = resp.headers["Set-Cookie"]
        attributes = [part.strip().lower() for part in cookie.split(";")]
        name, value = cookie.split(";")[0].split("=", 1)
        assert name == "ollama_metrics_token"
        assert TOKEN not in value and len(value) == 64
        assert {"httponly", "samesite=strict", "path=/analytics"} <= set(attributes)

        for path in ("/analytics", "/analytics/search", "/analytics/stats", "/analytics/live",
                     "/analytics/loaded", "/analytics/timeseries", "/analytics/models"):
            async with browser.get(proxy.url + path) as resp:
                assert resp.status == 200, path
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        other.cookie_jar.update_cookies({"ollama_metrics_token": "0" * 64})
        for path in ("/analytics", "/analytics/search"):
            async with other.get(proxy.url + path) as resp:
                assert resp.status == 401, path
        async with other.get(proxy.url + "/analytics", headers=AUTH) as resp:
            assert resp.status == 200  # the bearer header opens the page too


async def test_the_cookie_opens_analytics_only(fake: FakeOllama, start_proxy: StartProxy,
                                              http: aiohttp.ClientSession,
                                              tmp_path: Path) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_token=TOKEN, analytics_protect_metrics=True))
    cookie = {"Cookie": f"ollama_metrics_token={cookie_value(TOKEN)}"}
    async with http.get(proxy.url + "/analytics/stats", headers=cookie) as resp:
        assert resp.status == 200
    async with http.get(proxy.url + "/metrics", headers=cookie) as resp:
        assert resp.status == 401  # the bearer token opens /metrics; the cookie does not
    async with http.get(proxy.url + "/metrics", headers=AUTH) as resp:
        assert resp.status == 200


async def test_without_a_token_the_query_is_dropped(fake: FakeOllama, start_proxy: StartProxy,
                                                    http: aiohttp.ClientSession,
                                                    tmp_path: Path) -> None:
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path))
    async with http.get(proxy.url + "/analytics", params={"token": "anything"},
                        allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/analytics"
        assert "Set-Cookie" not in resp.headers


# --- Chromium --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def _chromium() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


@pytest.fixture
def browser(_chromium: WebDriver) -> Iterator[WebDriver]:
    """The module's Chromium, on a blank page with an empty console: a page left by the test
    before keeps polling a proxy that has stopped, and its errors are not this test's."""
    _chromium.get("about:blank")
    console_errors(_chromium)  # reading clears them
    yield _chromium
    _chromium.get("about:blank")


async def test_dashboard_in_chromium(fake: FakeOllama, start_proxy: StartProxy,
                                     http: aiohttp.ClientSession, tmp_path: Path,
                                     browser: WebDriver) -> None:
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path, TOKEN), ps_interval=0.2)
    async with ollama.AsyncClient(host=proxy.url) as client:
        await client.chat(model="llama3.2", messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"}])
        await client.generate(model="llama3.2", prompt="Summarize the meeting about giraffes")
        async for _ in await client.chat(model="llama3.2", stream=True, messages=[
                {"role": "user", "content": "Write a haiku about the sea"}]):
            pass
        await client.chat(model="llama3.2", messages=[{"role": "user", "content": HOSTILE}])
        with pytest.raises(ollama.ResponseError):
            await client.chat(model="missing", messages=[{"role": "user", "content": "hi"}])
    await records(proxy, http, 5, headers=AUTH)
    await asyncio.to_thread(_browse, browser, proxy)


WIDER = """return [...document.querySelectorAll("body *")]
    .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 0.5)
    .map((e) => `${e.tagName}#${e.id}.${e.className}: ${e.getBoundingClientRect().right}`)
    .slice(0, 10);"""


def _rows(driver: WebDriver) -> list[str]:
    return [row.text for row in
            driver.find_elements(By.CSS_SELECTOR, "#interactions tbody tr[data-id]")]


def _browse(driver: WebDriver, proxy: RunningProxy) -> None:
    # The page re-renders rows as results arrive: a row read mid-swap is read again.
    wait = WebDriverWait(driver, 10, ignored_exceptions=[StaleElementReferenceException])
    viewport(driver, 1280, 800)
    driver.get(proxy.url + "/analytics")
    assert driver.find_element(By.TAG_NAME, "h1").text == \
        "This dashboard needs the analytics token"
    console_errors(driver)  # the 401 itself is logged; what counts comes next

    driver.get(f"{proxy.url}/analytics?token={TOKEN}")
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    assert driver.current_url == proxy.url + "/analytics"
    assert driver.find_element(By.ID, "notice").get_attribute("hidden") is not None
    wait.until(lambda d: len(_rows(d)) == 5)
    rows = _rows(driver)
    assert any("Why is the sky blue?" in r and "llama3.2" in r for r in rows), rows
    assert any("missing" in r and "error 404" in r for r in rows), rows
    assert any(HOSTILE in r for r in rows), rows  # the table shows it as text
    assert driver.find_element(By.ID, "c-rps-sub").text == "5 requests"
    assert driver.find_element(By.ID, "c-err-sub").text == "1 error · 0 cancelled"
    assert len(driver.find_elements(By.CSS_SELECTOR, ".plot canvas")) >= 4
    wait.until(lambda d: "llama3.2:latest" in d.find_element(By.ID, "loaded").text)
    assert driver.find_element(By.ID, "ollama").text == "Ollama 0.33.0 up"
    driver.find_element(By.CSS_SELECTOR, '[data-window="7d"]').click()
    wait.until(lambda d: d.find_element(By.ID, "overview-range").text == "last 7 days")
    screenshot(driver, "dashboard.png")

    search = driver.find_element(By.ID, "f-q")
    search.send_keys("giraffes")
    wait.until(lambda d: len(_rows(d)) == 1 and "the meeting about giraffes" in _rows(d)[0])
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys("pwned")
    wait.until(lambda d: len(_rows(d)) == 1 and HOSTILE in _rows(d)[0])

    # Keyboard: the row's time is a button; Enter opens the detail view, Escape closes it.
    driver.find_element(By.CSS_SELECTOR, "#interactions tbody .rowlink").send_keys(Keys.ENTER)
    dialog = driver.find_element(By.ID, "detail")
    wait.until(lambda d: HOSTILE in dialog.text)
    texts = [m.text for m in dialog.find_elements(By.CSS_SELECTOR, ".msg")]
    assert texts[0] == f"USER\n{HOSTILE}", texts
    assert texts[1] == "ASSISTANT\nHello, world!", texts
    assert "Prompt tokens\n26" in dialog.text and "Output tokens\n4" in dialog.text
    assert driver.execute_script("return window.__pwned") is None
    assert driver.execute_script("return document.images.length") == 0
    dialog.send_keys(Keys.ESCAPE)
    wait.until(lambda d: not dialog.get_attribute("open"))

    # A conversation with roles, opened by clicking its row.
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys("sky")
    wait.until(lambda d: len(_rows(d)) == 1 and "sky" in _rows(d)[0])
    driver.find_element(By.CSS_SELECTOR, "#interactions tbody td.prompt").click()
    wait.until(lambda d: "Why is the sky blue?" in dialog.text)
    roles = [r.text for r in dialog.find_elements(By.CSS_SELECTOR, ".msg .role")]
    assert roles == ["SYSTEM", "USER", "ASSISTANT"]
    screenshot(driver, "dashboard-detail.png", full_page=False)
    driver.find_element(By.ID, "detail-close").click()

    # A search that fails (over the search budget) clears the rows: the reason takes their
    # place (issue 15: it showed above the previous rows).
    driver.execute_script("const q = document.getElementById('f-q'); q.value = 'w '.repeat(300);"
                          "q.dispatchEvent(new Event('input', {bubbles: true}));")
    body = "#interactions tbody"
    wait.until(lambda d: _rows(d) == [] and "at most 512 characters" in d.find_element(
        By.CSS_SELECTOR, body).text)
    assert "sky" not in driver.find_element(By.CSS_SELECTOR, body).text
    console_errors(driver)  # the 400 itself is logged
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys("sky")
    wait.until(lambda d: len(_rows(d)) == 1 and "sky" in _rows(d)[0])

    assert driver.execute_script("return window.__pwned") is None
    assert console_errors(driver) == []
    # The page's own requests carry the cookie, and every answer the policy.
    assert driver.execute_script(
        "return fetch('/analytics').then((r) => r.headers.get('Content-Security-Policy'))"
    ) == CSP
    # The browser enforces it: a script put into the page is refused.
    driver.execute_script("const s = document.createElement('script');"
                          "s.textContent = 'window.__inline = 1'; document.body.append(s);")
    assert driver.execute_script("return window.__inline") is None
    (refused,) = console_errors(driver)
    assert "Content Security Policy" in refused["message"], refused

    viewport(driver, 390, 844)  # a phone: nothing sticks out sideways (charts follow suit)
    try:
        wait.until(lambda d: d.execute_script("return window.innerWidth == 390 && "
                                              "document.documentElement.scrollWidth <= 390"))
    except TimeoutException:
        raise AssertionError(driver.execute_script(WIDER)) from None
    screenshot(driver, "dashboard-narrow.png")
    assert console_errors(driver) == []


LONG_MODEL = "m" * 100_000

COLUMNS_SHOWN = """return [...document.querySelectorAll(arguments[0])]
    .filter((e) => e.getBoundingClientRect().width > 0)
    .filter((e) => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
    .map((e) => e.textContent);"""


async def test_a_huge_model_name_does_not_widen_the_page(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
        browser: WebDriver) -> None:
    """One record's 100,000-character model name: the tables keep every column on screen, no
    sideways scrolling; the cell ends in an ellipsis, the detail view has all the record keeps."""
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path, TOKEN))
    async with http.post(proxy.url + "/api/chat", json={
            "model": LONG_MODEL, "stream": False,
            "messages": [{"role": "user", "content": "hi"}]}) as resp:
        await resp.read()
    await records(proxy, http, 1, headers=AUTH)
    await asyncio.to_thread(_browse_long, browser, proxy)


def _browse_long(driver: WebDriver, proxy: RunningProxy) -> None:
    wait = WebDriverWait(driver, 10, ignored_exceptions=[StaleElementReferenceException])
    viewport(driver, 1280, 800)
    driver.get(f"{proxy.url}/analytics?token={TOKEN}")
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    wait.until(lambda d: len(_rows(d)) == 1)
    wait.until(lambda d: "…" in d.find_element(By.ID, "models").text)
    assert driver.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    for table in ("#models", "#interactions"):
        cut = driver.execute_script(COLUMNS_SHOWN, f"{table} th, {table} tbody td")
        assert cut == [], (table, [c[:60] for c in cut])
    row = _rows(driver)[0]
    assert "m…" in row and len(row) < 500, len(row)
    screenshot(driver, "dashboard-long-model.png")
    driver.find_element(By.CSS_SELECTOR, "#interactions tbody .rowlink").click()
    # The record keeps a model name's first 256 characters (analytics/record.py NAME_CHARS):
    # the detail view shows all of those, the table cell 40.
    title = driver.find_element(By.ID, "detail-title")
    wait.until(lambda d: "m" * 256 in (title.get_attribute("textContent") or ""))


# uPlot draws the axes on a canvas: to know where a tick label lands, the page's plots are kept
# as they are made (the vendored script assigns the global `uPlot`, this wraps its constructor).
KEEP_PLOTS = """(() => {
  let real;
  window.__plots = [];
  Object.defineProperty(window, "uPlot", {
    configurable: true,
    get() { return real; },
    set(made) {
      real = new Proxy(made, { construct(target, args) {
        const plot = new target(...args);
        window.__plots.push(plot);
        return plot;
      } });
    },
  });
})();"""

# Each plot's last time label on the x axis: where it ends against the canvas it is drawn on
# (labels are centred on their tick, in the axis's font), in CSS pixels. With `hour`, each plot
# first shows a series that ends on a round hour (as `08:00` did when it was cut).
LAST_TICKS = """const [hour, done] = arguments;
const measure = document.createElement("canvas").getContext("2d");
if (hour !== null) {
  for (const u of window.__plots) {
    const xs = Array.from({ length: 13 }, (_, i) => hour - (12 - i) * 300);
    u.setData([xs, ...u.series.slice(1).map(() => xs.map((_, i) => i % 3))]);
  }
}
setTimeout(() => done(window.__plots.filter((u) => u.width > 0).map((u) => {
  const axis = u.axes[0];
  const labels = axis._values.map((text, i) => [u.valToPos(axis._splits[i], "x", true), text])
    .filter(([, text]) => text);
  const [at, text] = labels.reduce((a, b) => (b[0] > a[0] ? b : a));
  measure.font = "11px system-ui, sans-serif";
  const ratio = u.ctx.canvas.width / u.ctx.canvas.getBoundingClientRect().width;
  const box = u.ctx.canvas.getBoundingClientRect();
  return { chart: u.root.parentElement.id, text,
           right: box.left + (at / ratio) + measure.measureText(text).width / 2,
           canvasRight: box.right, boxRight: u.root.parentElement.getBoundingClientRect().right };
})), 100);"""


async def test_time_labels_and_a_model_kept_forever(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
        browser: WebDriver) -> None:
    """The last time label of every chart is drawn whole inside its canvas (it was cut to
    `08:0`), and a model kept loaded with keep_alive -1 unloads "forever" (was `631840 h 5 min`)."""
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path, TOKEN), ps_interval=0.2)
    async with http.post(proxy.url + "/api/generate", json={
            "model": "llama3.2", "prompt": "hi", "stream": False, "keep_alive": -1}) as resp:
        assert resp.status == 200
    await records(proxy, http, 1, headers=AUTH)
    kept = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": KEEP_PLOTS})
    try:
        await asyncio.to_thread(_browse_ticks_and_forever, browser, proxy)
    finally:  # the browser serves the module's other tests
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", kept)


def _loaded_rows(driver: WebDriver) -> dict[str, list[str]]:
    rows = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "#loaded tbody tr"):
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        if len(cells) > 1:
            rows[cells[0]] = cells
    return rows


def _browse_ticks_and_forever(driver: WebDriver, proxy: RunningProxy) -> None:
    wait = WebDriverWait(driver, 10, ignored_exceptions=[StaleElementReferenceException])
    viewport(driver, 1280, 800)
    driver.get(f"{proxy.url}/analytics?token={TOKEN}")
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    wait.until(lambda d: len(_loaded_rows(d)) == 2)
    # The table shows the proxy's latest /api/ps poll, and a poll may have come just before the
    # generate reached Ollama: the next refresh shows the model kept.
    with contextlib.suppress(TimeoutException):
        wait.until(lambda d: _loaded_rows(d).get("llama3.2:latest", [""])[-1] == "forever")
    loaded = _loaded_rows(driver)
    assert loaded["llama3.2:latest"][-1] == "forever", loaded
    assert loaded["all-minilm:latest"][-1] in ("4 minutes", "5 minutes"), loaded
    # Sizes in decimal units, as `ollama ps` and `ollama-metrics status` write them.
    assert loaded["all-minilm:latest"][1] == "46.0 MB", loaded

    hour = driver.execute_script("const d = new Date(); d.setMinutes(0, 0, 0);"
                                 "return d.getTime() / 1000;")
    for window in ("1h", "24h", None):  # the windows' own series, then one ending on the hour
        if window is not None:
            driver.find_element(By.CSS_SELECTOR, f'[data-window="{window}"]').click()
            wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
        ticks = driver.execute_async_script(LAST_TICKS, None if window else hour)
        assert len(ticks) >= 4, ticks
        for tick in ticks:
            assert tick["right"] <= tick["canvasRight"] + 0.5, (window, tick)
            assert tick["canvasRight"] <= tick["boxRight"] + 0.5, (window, tick)
    ends = {t["text"] for t in ticks}
    assert ends == {driver.execute_script(
        "return new Date(arguments[0] * 1000).toLocaleTimeString('en-GB', "
        "{hour: '2-digit', minute: '2-digit'})", hour)}, ticks
    screenshot(driver, "dashboard-last-tick.png", full_page=False)
    assert console_errors(driver) == []


async def test_active_requests_count_those_not_listed(
        fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path, browser: WebDriver) -> None:
    """The live snapshot lists at most `shown` requests in flight (1,000 in service; 2 here):
    the card counts them all (`active_count`), the table says how many it does not list."""
    fake.scenarios["slow:latest"] = Scenario(tokens=["a"] * 500, token_delay=0.02)
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path, TOKEN))
    proxy.app[LIVE].shown = 2
    async with aiohttp.ClientSession() as client:
        streams = [await client.post(proxy.url + "/api/generate",
                                     json={"model": "slow", "prompt": str(n)}) for n in range(5)]
        try:
            for stream in streams:
                await stream.content.readline()
            await asyncio.to_thread(_browse_active, browser, proxy)
        finally:
            for stream in streams:
                stream.close()


def _browse_active(driver: WebDriver, proxy: RunningProxy) -> None:
    wait = WebDriverWait(driver, 10, ignored_exceptions=[StaleElementReferenceException])
    viewport(driver, 1280, 800)
    driver.get(f"{proxy.url}/analytics?token={TOKEN}")
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    wait.until(lambda d: d.find_element(By.ID, "c-active").text.isdigit())
    assert driver.find_element(By.ID, "c-active").text == "5"
    rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#active tbody tr")]
    assert len(rows) == 3 and all("slow:latest" in r for r in rows[:2]), rows
    assert rows[2] == "+3 more, not listed", rows
    assert console_errors(driver) == []
