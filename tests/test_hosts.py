"""Ollama's Host check at the proxy (hosts.py): on loopback, a Host Ollama would refuse gets an
empty 403 before any route; beyond loopback nothing is checked. One test per rule of
allowedHostsMiddleware / allowedHost (Ollama's server/routes.go), each across a proxied route,
/metrics, /test, the analytics API and the dashboard; then the DNS-rebinding attack it stops,
in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import psutil
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from analytics_helpers import DATA, _seed
from browser import chromium
from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import RunningProxy, raw_request
from ollama_metrics.analytics.settings import AnalyticsConfig
from wire import Reply, parse_replies

SECRET = "summarize the meeting notes"  # a stored prompt (analytics_helpers.DATA)
# A proxied route, the metrics, the health route, the analytics API, the dashboard page.
PATHS = ["/api/tags", "/metrics", "/test", "/analytics/search", "/analytics"]


@pytest.fixture
async def local(fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path) -> RunningProxy:
    """The default set-up an attacker meets: loopback, records stored, no token."""
    await _seed(tmp_path, DATA)
    return await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_retention_days=0))


async def _get(port: int, host: bytes | None, path: str, *, target: str | None = None,
               method: str = "GET", version: bytes = b"1.1") -> Reply:
    head = b"%s %s HTTP/%s\r\n" % (method.encode(), (target or path).encode(), version)
    if host is not None:
        head += b"Host: " + host + b"\r\n"
    (reply,) = parse_replies(await raw_request(port, head + b"Connection: close\r\n\r\n"))
    return reply


async def _statuses(proxy: RunningProxy, host: bytes | None, **kwargs: Any) -> dict[str, int]:
    return {path: (await _get(proxy.port, host, path, **kwargs)).status for path in PATHS}


async def assert_allowed(proxy: RunningProxy, host: bytes | None, **kwargs: Any) -> None:
    got = await _statuses(proxy, host, **kwargs)
    assert got == {"/api/tags": 200, "/metrics": 200, "/test": 200, "/analytics/search": 200,
                   "/analytics": 200}, host


async def assert_refused(proxy: RunningProxy, fake: FakeOllama, host: bytes | None,
                         **kwargs: Any) -> None:
    for path in PATHS:
        reply = await _get(proxy.port, host, path + "?refused", **kwargs)
        # Ollama's AbortWithStatus(403): no body, no type.
        assert (reply.status, reply.body, reply.header("Content-Type")) == (403, b"", None), \
            (host, path)
    assert not _reached(fake, "refused")


def _reached(fake: FakeOllama, marker: str) -> list[str]:
    """What reached Ollama with `marker` in its query (the proxy polls Ollama on its own)."""
    return [r.path_qs for r in fake.requests if marker in r.path_qs]


def _port(proxy: RunningProxy) -> bytes:
    return b"%d" % proxy.port


# --- one test per rule ----------------------------------------------------------------------

async def test_localhost_with_and_without_port_in_any_case(local: RunningProxy) -> None:
    for host in (b"localhost", b"localhost:" + _port(local), b"LocalHost:1", b"LOCALHOST"):
        await assert_allowed(local, host)


async def test_the_machines_hostname_in_any_case(local: RunningProxy) -> None:
    name = socket.gethostname().encode()
    for host in (name, name.upper() + b":" + _port(local), name.lower()):
        await assert_allowed(local, host)


@pytest.mark.parametrize("host", [b"app.localhost", b"a.b.localhost:8080", b"printer.local",
                                  b"NAS.Local:1", b"host.docker.internal", b"x.INTERNAL:443"])
async def test_local_top_level_domains(local: RunningProxy, host: bytes) -> None:
    await assert_allowed(local, host)


@pytest.mark.parametrize("host", [
    b"evil.example", b"evil.example:11434", b"EVIL.example",
    b"localhost.evil.example", b"evillocalhost", b"local", b"internal",  # no dot before the TLD
    b"127.0.0.1.nip.io", b"10.0.0.1.evil.example:1",  # addresses inside a name are names
    b"localhost.", b"printer.local.:1",  # a trailing dot is not dropped (Ollama neither)
    b"x", b"gpu-box.lan:11434",
])
async def test_other_names_are_refused(local: RunningProxy, fake: FakeOllama,
                                       host: bytes) -> None:
    await assert_refused(local, fake, host)


@pytest.mark.parametrize("host", [
    b"127.0.0.1", b"127.0.0.1:11434", b"127.9.8.7:1",  # loopback, all of 127/8
    b"[::1]:1", b"::1",  # IPv6 loopback; bare, net.SplitHostPort fails and the whole is the IP
    b"[::ffff:127.0.0.1]:1",  # IPv4-mapped: Go unmaps for loopback and private
    b"10.1.2.3:80", b"172.16.0.1", b"172.31.255.255", b"192.168.1.10:8080",  # RFC 1918
    b"[fd12:3456::1]:1", b"[fc00::1]:1", b"[::ffff:10.0.0.1]:1",  # fc00::/7, mapped private
    b"0.0.0.0:11434", b"[::]:1",  # unspecified
])
async def test_loopback_private_and_unspecified_addresses(local: RunningProxy,
                                                          host: bytes) -> None:
    await assert_allowed(local, host)


@pytest.mark.parametrize("host", [
    b"8.8.8.8", b"1.1.1.1:11434", b"172.32.0.1", b"192.169.0.1", b"11.0.0.1",
    b"[2001:db8::1]:1", b"[fe00::1]:1",
    b"169.254.1.1",  # link-local is not private to Go (and is on no interface here)
    b"[::1]",  # bracketed without a port: net.SplitHostPort fails, "[::1]" is no address
    b"[::1]:1:2", b"[::1]x:1", b"::1]:1",  # malformed: the whole value is looked at, and refused
    b"[::ffff:0.0.0.0]:1",  # unspecified is exact in Go: a mapped 0.0.0.0 is not
    b"[::%25lo]:1",  # a zoned unspecified address is not the unspecified address
    b"127.0.0.01", b"2130706433", b"0x7f.0.0.1",  # not IP literals to netip.ParseAddr either
])
async def test_other_addresses_are_refused(local: RunningProxy, fake: FakeOllama,
                                           host: bytes) -> None:
    await assert_refused(local, fake, host)


def _interface_address() -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address of this machine's interfaces that no other rule allows."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(a.address.split("%")[0])
                if not (ip.is_loopback or ip in ipaddress.ip_network("10.0.0.0/8")
                        or ip in ipaddress.ip_network("172.16.0.0/12")
                        or ip in ipaddress.ip_network("192.168.0.0/16")
                        or ip in ipaddress.ip_network("fc00::/7")):
                    return ip
    return None


async def test_an_address_of_a_local_interface(local: RunningProxy, fake: FakeOllama) -> None:
    ip = _interface_address()
    if ip is None:
        pytest.skip("no interface address outside loopback and the private ranges")
    await assert_allowed(local, _literal(ip, local.port))
    neighbour = ip + 1 if ip + 1 not in _all_interface_addresses() else ip - 1
    await assert_refused(local, fake, _literal(neighbour, 1))


def _literal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bytes:
    return (f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}").encode()


def _all_interface_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(a.address.split("%")[0])
            for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)]


async def test_empty_host_is_allowed(local: RunningProxy) -> None:
    await assert_allowed(local, b"")  # `Host:` with no value
    await assert_allowed(local, b":" + _port(local))  # the host part empty


async def test_http_10_without_host_is_allowed(local: RunningProxy) -> None:
    """HTTP/1.0 needs no Host; Go's Request.Host is then empty, which Ollama allows."""
    await assert_allowed(local, None, version=b"1.0")


async def test_absolute_form_target_is_judged_by_its_authority(local: RunningProxy,
                                                              fake: FakeOllama) -> None:
    """Go's Request.Host is the URL's authority when the request target is absolute."""
    for path in PATHS:
        evil = await _get(local.port, b"localhost", path,
                          target=f"http://evil.example:{local.port}{path}")
        assert (evil.status, evil.body) == (403, b""), path
        fine = await _get(local.port, b"evil.example", path,
                          target=f"http://localhost:{local.port}{path}")
        assert fine.status == 200, path


async def test_undecodable_host_bytes_are_refused_not_an_error(local: RunningProxy,
                                                             fake: FakeOllama) -> None:
    await assert_refused(local, fake, b"\xff\xfe")
    await assert_refused(local, fake, b"loc\xc3\xa1lhost")


async def test_every_route_of_the_app_is_behind_the_check(local: RunningProxy,
                                                         fake: FakeOllama) -> None:
    """Not only PATHS: every route the app serves, static files and unknown paths included."""
    paths = ["/analytics/static/app.css", "/dashboard", "/no/such/route", "/", "/api/ps"]
    for resource in local.app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter") or ""
        if path.startswith("/") and "{tail" not in path:
            paths.append(path.replace("{id}", "rec00001"))
    assert {"/analytics/search", "/analytics/live", "/metrics", "/test"} <= set(paths)
    for path in sorted(set(paths)):
        for method in ("GET", "POST", "HEAD", "DELETE", "OPTIONS"):
            reply = await _get(local.port, b"evil.example", path + "?refused", method=method)
            assert reply.status == 403, (method, path)
    assert not _reached(fake, "refused")


async def test_preflight_of_an_allowed_host_is_ollamas(local: RunningProxy,
                                                       fake: FakeOllama) -> None:
    """OPTIONS passes the check and Ollama answers it (CORS preflight); refused, it never
    reaches Ollama."""
    head = (b"OPTIONS /api/chat HTTP/1.1\r\nHost: localhost:%d\r\nOrigin: http://localhost:3000"
            b"\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n" % local.port)
    (reply,) = parse_replies(await raw_request(local.port, head))
    assert reply.status == 204
    assert reply.header("Access-Control-Allow-Origin") == "http://localhost:3000"
    (refused,) = parse_replies(await raw_request(local.port, head.replace(
        b"Host: localhost", b"Host: evil.example")))
    assert refused.status == 403
    assert [r.method for r in fake.requests if r.path_qs == "/api/chat"] == ["OPTIONS"]


async def test_beyond_loopback_nothing_is_checked(fake: FakeOllama, start_proxy: StartProxy,
                                                  tmp_path: Path) -> None:
    """As Ollama: listening on all interfaces, any Host is served."""
    await _seed(tmp_path, DATA)
    proxy = await start_proxy(fake.url, listen="0.0.0.0:0", analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_retention_days=0))
    for host in (b"evil.example:%d" % proxy.port, b"8.8.8.8", b"[::1]"):
        await assert_allowed(proxy, host)


# --- DNS rebinding in Chromium ----------------------------------------------------------------

ATTACK = b"""<!doctype html><title>evil</title><script>
fetch("/analytics/search?limit=100")
  .then(async (r) => { window.stolen = {status: r.status, body: await r.text()}; })
  .catch((e) => { window.stolen = {status: 0, body: String(e)}; });
</script>"""
ATTACKER = "127.0.0.2"  # where evil.example points while its page loads


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def rebinding(port: int, victim: str) -> AsyncIterator[None]:
    """evil.example:`port`, as a rebinding attacker runs it: its own server hands out the page,
    then the name points at the victim, so every later connection's bytes (Host: evil.example
    and all) reach `victim`:`port` as the browser sent them."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        if head.startswith(b"GET / "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(ATTACK), ATTACK))
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(victim, port)
        up_writer.write(head)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(serve, ATTACKER, port)
    try:
        yield
    finally:
        server.close()


def _attack(port: int) -> dict[str, Any]:
    """Load the attacker's page in a fresh Chromium that resolves evil.example to the attacker,
    and return what its script read."""
    with chromium(1280, 800, f"--host-resolver-rules=MAP evil.example {ATTACKER}") as driver:
        driver.set_page_load_timeout(20)
        driver.get(f"http://evil.example:{port}/")
        stolen: dict[str, Any] = WebDriverWait(driver, 20).until(_stolen)
        return stolen


def _stolen(driver: WebDriver) -> dict[str, Any] | Literal[False]:
    value = driver.execute_script("return window.stolen || null")
    return value if isinstance(value, dict) else False


@pytest.mark.slow(reason="Chromium")
async def test_dns_rebinding_reads_nothing(local: RunningProxy) -> None:
    async with rebinding(local.port, "127.0.0.1"):
        stolen = await asyncio.to_thread(_attack, local.port)
    assert stolen == {"status": 403, "body": ""}


@pytest.mark.slow(reason="Chromium")
async def test_dns_rebinding_without_the_check_reads_the_records(
    fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path,
) -> None:
    """The attack above is real: against a proxy that does not check (listening beyond
    loopback, as Ollama does not check there either), the same page reads the prompts."""
    lan = next((ip for ip in _all_interface_addresses()
                if ip.version == 4 and not ip.is_loopback), None)
    if lan is None:
        pytest.skip("no IPv4 interface address beyond loopback")
    await _seed(tmp_path, DATA)
    proxy = await start_proxy(fake.url, listen=f"{lan}:0", analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_retention_days=0))
    async with rebinding(proxy.port, str(lan)):
        stolen = await asyncio.to_thread(_attack, proxy.port)
    assert stolen["status"] == 200
    assert SECRET in stolen["body"]
