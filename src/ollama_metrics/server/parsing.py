"""Large request bodies parsed in a process of their own (ollama/parse_apart.py).

orjson holds the GIL for a whole parse, about 12 ms a MB of small messages, so a parse on a
thread still holds the event loop: a 30 MB chat held it 0.4 s. `ParseProcess.parse` sends the
body to the parse process in slices, waiting for the pipe to drain after each (never a second
copy of the body in memory), and gets back what a record keeps of it. One body at a time; the
process starts with the first and is started again if it dies. A parse that is cancelled (the
client left) or fails kills the process at once, whose stream is then in an unknown state (it is
reaped in the background, never while the next body waits), and returns None (or raises the
cancellation): the caller parses that body some other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import sys
from typing import Any

from ..ollama.parse_apart import KEEP, SIZE

log = logging.getLogger(__name__)

SLICE = 1 << 18  # bytes of a body written to the pipe before waiting for it to drain
STOP_WITHIN = 2.0  # seconds a process has to exit (once its stdin is closed, or once killed)


class ParseProcess:
    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._reaping: set[asyncio.Task[None]] = set()

    async def parse(self, body: bytearray, keep_messages: int, stream: bool
                    ) -> dict[str, Any] | None:
        """read_request_apart(body, keep_messages, stream) in the parse process; None if it
        could not be done there."""
        async with self._lock:
            try:
                process = await self._started()
                assert process.stdin is not None and process.stdout is not None
                process.stdin.write(len(body).to_bytes(SIZE, "big")
                                    + min(keep_messages, 2**(8 * KEEP) - 1).to_bytes(KEEP, "big")
                                    + bytes((stream,)))
                view = memoryview(body)
                for at in range(0, len(view), SLICE):
                    process.stdin.write(view[at:at + SLICE])
                    await process.stdin.drain()
                size = int.from_bytes(await process.stdout.readexactly(SIZE), "big")
                fields = pickle.loads(await process.stdout.readexactly(size))
                if not isinstance(fields, dict):
                    raise TypeError(f"an answer of type {type(fields).__name__}")
            except asyncio.CancelledError:
                self._abandon()
                raise
            except Exception as exc:  # total: a parse that fails here is done on the thread
                log.warning("the request parse process failed (%s: %s); parsing on a thread",
                            type(exc).__name__, exc)
                self._abandon()
                return None
            return fields

    async def _started(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ollama_metrics.ollama.parse_apart",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return self._process

    def _abandon(self) -> None:
        """Kill the process now and reap it in the background."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        task = asyncio.ensure_future(_reap(process))
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def close(self) -> None:
        """End the process once the body being parsed, if any, is done."""
        async with self._lock:
            process, self._process = self._process, None
            if process is not None:
                try:  # stdin closed: it exits at the end of its loop
                    await asyncio.wait_for(process.communicate(), STOP_WITHIN)
                except (asyncio.TimeoutError, OSError):
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await _reap(process)
        if self._reaping:
            await asyncio.wait(set(self._reaping), timeout=2 * STOP_WITHIN)


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Wait for a killed process, reading what it left on stdout: a paused pipe never sees its
    end, and asyncio's wait() waits for the pipes too."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(process.communicate(), STOP_WITHIN)
