"""The open-file limit: lifted at start, and told in the log when it is reached.

Each exchange in flight holds two descriptors in the proxy. When none is left, no new connection
can be taken, and neither event loop says so usefully: asyncio logs a traceback at every retry
of accept (each second, for each waiting connection), and uvloop (libuv) says nothing at all; it
accepts each new connection with a descriptor it keeps in reserve for this and closes it at
once. So `Watch` tells it itself, one line when an episode begins and one when it ends, from
asyncio's accept error and from a probe each second (one dup() and close(), which fails with
EMFILE exactly when accept would).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
from typing import Any

log = logging.getLogger("ollama_metrics")

PROBE_PERIOD = 1.0
REPEAT_AFTER = 60.0  # seconds: an episode starting sooner after the last one told is not told
_EXHAUSTED = (errno.EMFILE, errno.ENFILE)
_FEW_FILES = 4096  # under this, a few hundred streams (two descriptors each) exhaust the limit


def lift_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard one, as every Go program does at start
    (Ollama among them). Each exchange in flight holds two descriptors here, one in Ollama: left
    at a desktop's usual soft limit (1,024 on Linux, 256 on macOS), the proxy would refuse
    connections at a few hundred concurrent streams that Ollama alone would take."""
    try:
        import resource
    except ImportError:  # Windows: no such limit on sockets
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS refuses a soft limit over OPEN_MAX (10,240) whatever the hard limit says.
    target = min(hard, 10240) if sys.platform == "darwin" else hard
    if soft != resource.RLIM_INFINITY and (target == resource.RLIM_INFINITY or target > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        else:
            log.debug("open-file limit raised from %d to %d", soft, target)
            soft = target
    if soft != resource.RLIM_INFINITY and soft < _FEW_FILES:
        log.warning("this process may open only %d files, and each request in flight takes two: "
                    "raise the hard limit (ulimit -Hn, or LimitNOFILE= for a systemd service) to "
                    "proxy more than a few hundred at once", soft)


def _limit() -> str:
    try:
        import resource
    except ImportError:
        return "unknown"
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


class Watch:
    """Logs, for the loop it is started on, when the process runs out of descriptors (once an
    episode, and an episode at most once every REPEAT_AFTER seconds) and when it has some again.
    `fd` is any descriptor of ours to dup() for the probe (the listening socket's)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None  # the loop's exception handler before ours
        self._timer: asyncio.TimerHandle | None = None
        self._since: float | None = None  # when this episode began; None: not out of them
        self._told = False  # this episode was logged
        self._last_told = -REPEAT_AFTER

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._exception)
        if sys.platform != "win32":  # sockets are not descriptors there: no such limit
            self._timer = loop.call_later(PROBE_PERIOD, self._probe)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous)
            self._loop = None

    def _exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _EXHAUSTED:  # asyncio's accept
            self._exhausted(exc)
        elif self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _probe(self) -> None:
        assert self._loop is not None
        try:
            os.close(os.dup(self._fd))
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                self._exhausted(exc)
        else:
            self._available()
        self._timer = self._loop.call_later(PROBE_PERIOD, self._probe)

    def _exhausted(self, exc: OSError) -> None:
        if self._since is not None:
            return
        assert self._loop is not None
        self._since = now = self._loop.time()
        self._told = now - self._last_told >= REPEAT_AFTER
        if self._told:
            self._last_told = now
            log.error("out of file descriptors (limit %s; %s): new connections are refused "
                      "until some close. Raise the limit: ulimit -n, or LimitNOFILE= for a "
                      "systemd service", _limit(), exc.strerror)

    def _available(self) -> None:
        if self._since is None:
            return
        assert self._loop is not None
        if self._told:
            log.info("file descriptors available again after %.0fs: new connections are "
                     "accepted", self._loop.time() - self._since)
        self._since = None
