"""The Windows service's body, less Windows: what it does when the Service Control Manager says
run or stop. `ServiceRunner.run()` serves in-process on its own event loop, logging (the proxy's
and Ollama's output) to a file, until `stop()` is called from another thread; then the proxy drains
and `ollama serve` is stopped as on Ctrl-C. (In-process rather than a `serve` child: a service has
no console to send that child CTRL_BREAK_EVENT through.) Nothing here imports pywin32, so tests
drive it on any platform as the SCM would: `run()` in one thread, `stop()` from another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import NAME

log = logging.getLogger("ollama_metrics.service")


Serve = Callable[[asyncio.Event], Awaitable[None]]


class ServiceRunner:
    """The service's body. `serve(stop)` is called in `run()` (so that a bad setting is logged
    like any other fault) and must serve until `stop` is set, as server.serve does."""

    def __init__(self, serve: Serve, log: Path) -> None:
        self.serve = serve
        self.log = log
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Ask `run()` to finish (thread-safe; before or while it runs)."""
        self._stopped.set()
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)

    def run(self) -> int:
        """Serve until stopped; 0 after a clean stop, 1 when serving failed (logged)."""
        import click

        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8", buffering=1) as out, \
                contextlib.redirect_stderr(out):  # where Ollama's own output is relayed
            handler = logging.StreamHandler(out)
            handler.setFormatter(logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root = logging.getLogger()
            root.addHandler(handler)
            root.setLevel(min(root.level or logging.INFO, logging.INFO))
            loop = self._loop = asyncio.new_event_loop()
            try:
                if not self._stopped.is_set():
                    loop.run_until_complete(self.serve(self._stop))
                return 0
            except click.ClickException as exc:
                log.critical("%s cannot start: %s", NAME, exc.format_message())
            except Exception as exc:  # the service must log why it stops, whatever it was
                log.critical("%s stopped: %s", NAME, exc, exc_info=not isinstance(exc, OSError))
            finally:
                loop.close()
                root.removeHandler(handler)
        return 1
