"""Ollama's Host check, in front of every route: `allowedHostsMiddleware` in its server/routes.go.

A web page can have a browser send requests to 127.0.0.1 under the page's own name (DNS
rebinding) and read the answers, every stored prompt at /analytics/search among them. Ollama
refuses those when it listens on loopback by looking at `Host`; the proxy sends Ollama its own
Host, so that check never sees the browser's: this module applies the same rule here. When the
proxy listens on loopback, a request whose Host does not name this machine is answered 403 with
an empty body, as Ollama answers it, before any route. Beyond loopback nothing is checked, as in
Ollama.

The rule, Ollama's to the letter: Host with its port cut as Go's `net.SplitHostPort` cuts it
(the whole value when that fails, so a bracketed IPv6 literal without a port is refused) is
allowed when it is an IP literal that is loopback, private (10/8, 172.16/12, 192.168/16,
fc00::/7; IPv4-mapped ones unmapped), unspecified (exactly `0.0.0.0` or `::`) or an address of
one of this machine's interfaces; or when, compared case-insensitively, it is empty, `localhost`,
this machine's hostname, or ends in `.localhost`, `.local` or `.internal`. A trailing dot is not
dropped: `localhost.` is refused, as by Ollama. OPTIONS requests that pass go on to Ollama,
whose answer (CORS preflight) is the one that counts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

_PRIVATE = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("172.16.0.0/12"),
            ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("fc00::/7"))
_UNSPECIFIED = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
_REMEMBERED = 1024  # Host values whose answer is kept; a client cycling through more costs CPU only


def split_host(hostport: str) -> str:
    """The host of `host:port` as Go's net.SplitHostPort finds it, or `hostport` when that
    fails (no port, too many colons, misplaced brackets), as Ollama falls back."""
    colon = hostport.rfind(":")
    if colon < 0:
        return hostport
    if hostport[0] == "[":
        end = hostport.find("]")
        if end + 1 != colon:  # no `]`, or `]` not just before the last colon
            return hostport
        host, j, k = hostport[1:end], 1, end + 1
    else:
        host, j, k = hostport[:colon], 0, 0
        if ":" in host:
            return hostport
    if "[" in hostport[j:] or "]" in hostport[k:]:
        return hostport
    return host


def interface_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of this machine's interfaces, up or down (Go's net.Interfaces and Addrs)."""
    import psutil  # only for Hosts that are IP literals beyond loopback and private ranges

    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(ValueError):  # as Go's ParseCIDR failing: skipped
                    found.add(ipaddress.ip_address(a.address.split("%")[0]))
    return found


def decide(hostport: str, hostname: str) -> tuple[bool, bool]:
    """(allowed, lasting): whether Ollama allows this Host value on a loopback listener, and
    whether the answer holds as long as the hostname (False when it came from the interfaces,
    which Ollama reads anew for each request). `hostname` is lower-case."""
    host = split_host(hostport)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
        plain = mapped or addr  # Go unmaps for IsLoopback and IsPrivate only
        zoned = isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None
        if plain.is_loopback or any(plain in net for net in _PRIVATE):
            return True, True
        if not zoned and addr in _UNSPECIFIED:
            return True, True
        # Go compares the text of the address with the interfaces', which have no zone and are
        # never IPv4-mapped.
        if not zoned and mapped is None:
            return addr in interface_addresses() or _name_allowed(host, hostname), False
    return _name_allowed(host, hostname), True


def _name_allowed(host: str, hostname: str) -> bool:
    host = host.lower()
    return host in ("", "localhost", hostname) or host.endswith(_LOCAL_SUFFIXES)


class HostRule:
    """Ollama's answer for each Host value, remembered for up to _REMEMBERED values."""

    def __init__(self) -> None:
        self._hostname = socket.gethostname().lower()
        self._remembered: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        allowed = self._remembered.get(host)
        if allowed is None:
            allowed, lasting = decide(host, self._hostname)
            if lasting and len(self._remembered) < _REMEMBERED:
                self._remembered[host] = allowed
        return allowed


def check_host(rule: HostRule) -> Middleware:
    """The middleware: 403, empty body, for a Host Ollama would refuse on loopback."""

    @web.middleware
    async def host_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        # request.host is the Host header, or the authority of an absolute-form target (as Go's
        # Request.Host); with neither (HTTP/1.0) it is the listening address, which is loopback
        # here and so allowed, as Ollama allows the empty Host.
        if rule.allows(request.host):
            return await handler(request)
        return web.Response(status=403)

    return host_check
