"""The records of a running proxy, read over its /analytics routes: what `search`, `stats` and
`export` ask first, since the proxy knows its store (a service's, another directory's, a
database's) wherever the command is run from.

Blocking (urllib), for the command line. `find` says whether a proxy answers at an address and
has a searchable store; `Remote` then reads it, raising RemoteError with the proxy's own reason
(a bad query, a missing token, a store past its deadline).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from yarl import URL

from ..ollama import control, probe

SEARCHABLE = ("sqlite", "postgres")


class RemoteError(Exception):
    """The proxy answered, but not with the records: `status` and its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Remote:
    url: URL
    token: str | None
    backends: tuple[str, ...]
    dir: str | None
    timeout: float

    @property
    def where(self) -> str:
        """Where the records are, in words: the proxy and its store."""
        store = ",".join(self.backends) + (f" in {self.dir}" if self.dir else "")
        return f"the proxy at {self.url} (recording to {store})"

    def _request(self, route: str, params: Mapping[str, str]) -> urllib.request.Request:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return urllib.request.Request(str(self.url.joinpath(route).with_query(dict(params))),
                                      headers=headers)

    def get(self, route: str, params: Mapping[str, str]) -> Any:
        """The JSON answer of GET /analytics/`route`?`params`."""
        request = self._request(route, params)
        try:
            status, body = control.get_json(request.full_url, self.timeout,
                                             dict(request.header_items()))
        except OSError as exc:
            raise RemoteError(0, f"{self.where} stopped answering: {exc}") from None
        if status != 200:
            raise _refused(status, body)
        return body

    def lines(self, route: str, params: Mapping[str, str]) -> Iterator[bytes]:
        """The lines of a streamed answer (JSON lines), as they arrive."""
        try:
            with control.open_url(self._request(route, params), self.timeout) as resp:
                yield from resp
        except urllib.error.HTTPError as exc:
            with exc:
                body = exc.read()
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            raise _refused(exc.code, parsed) from None
        except OSError as exc:  # includes a reply cut short (http.client.IncompleteRead)
            raise RemoteError(0, f"the export from {self.where} was cut short: {exc}") from None


def _refused(status: int, body: Any) -> RemoteError:
    reason = body.get("error") if isinstance(body, dict) else None
    if status == 401:
        reason = "the proxy's analytics need its token: --analytics-token (ANALYTICS_TOKEN)"
    return RemoteError(status, str(reason or f"the proxy answered {status}"))


def find(url: URL, token: str | None, timeout: float) -> Remote | None:
    """The proxy answering at `url`, if one does and keeps searchable records; else None."""
    answer = probe.identify(url, timeout=2.0)
    if answer.who is not probe.Who.PROXY:
        return None
    analytics = answer.health.get("analytics")
    analytics = analytics if isinstance(analytics, dict) else {}
    backends = tuple(b for b in analytics.get("backends") or () if isinstance(b, str))
    if not set(SEARCHABLE) & set(backends):
        return None
    where = analytics.get("dir")
    return Remote(url, token, backends, where if isinstance(where, str) else None, timeout)
