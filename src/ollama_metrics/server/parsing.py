"""Large request bodies parsed in a process of their own (ollama/parse_apart.py).

orjson holds the GIL for a whole parse, about 12 ms a MB of small messages, so a parse on a
thread still holds the event loop: a 30 MB chat held it 0.4 s. `ParseProcess.parse` sends the
body to the parse process in slices, waiting for the pipe to drain after each (never a second
copy of the body in memory), and gets back only what a record keeps of it. One body at a time;
the process starts with the first and is started again if it dies. A parse that is cancelled
(the client left) or fails ends the process, whose stream is then in an unknown state; the
caller parses that body some other way (None).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import sys
from typing import Any

from ..ollama.parse_apart import SIZE

log = logging.getLogger(__name__)

SLICE = 1 << 18  # bytes of a body written to the pipe before waiting for it to drain
STOP_WITHIN = 2.0  # seconds the process has to exit once its stdin is closed


class ParseProcess:
    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def parse(self, body: bytearray, keep_messages: int) -> dict[str, Any] | None:
        """read_request_apart(body, keep_messages) in the parse process; None if it could not
        be done there."""
        async with self._lock:
            try:
                process = await self._started()
                assert process.stdin is not None and process.stdout is not None
                process.stdin.write(len(body).to_bytes(SIZE, "big")
                                    + keep_messages.to_bytes(4, "big"))
                view = memoryview(body)
                for at in range(0, len(view), SLICE):
                    process.stdin.write(view[at:at + SLICE])
                    await process.stdin.drain()
                size = int.from_bytes(await process.stdout.readexactly(SIZE), "big")
                fields = pickle.loads(await process.stdout.readexactly(size))
            except (OSError, asyncio.IncompleteReadError, pickle.UnpicklingError) as exc:
                log.warning("the request parse process failed (%s); parsing on a thread",
                            exc or type(exc).__name__)
                await self._end()
                return None
            except asyncio.CancelledError:
                await asyncio.shield(self._end())
                raise
            assert isinstance(fields, dict)
            return fields

    async def _started(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ollama_metrics.ollama.parse_apart",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return self._process

    async def _end(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_WITHIN)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def close(self) -> None:
        """End the process once the body being parsed, if any, is done."""
        async with self._lock:
            await self._end()
