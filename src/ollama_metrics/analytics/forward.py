"""Records of several worker processes, written by one: workers forward, the main process writes.

With `--workers N` (server/workers.py) one process owns the stores. Each worker's `Forwarder` (an
observer, in place of the Recorder) builds the record of each finished exchange, as the Recorder
would (privacy applied; large exchanges on a thread), and sends the records of one event-loop
turn as one frame over a Unix socket: a 4-byte big-endian length, then an orjson array of
records. The main process's `Intake` reads them and hands each to its Recorder (`submit`), which
queues, writes, retries and counts as it does for its own.

Bounded and never waiting, like the Recorder: records that find the socket's buffer full (the
main process not keeping up) or no connection are dropped and counted in
`ollama_analytics_dropped_total` (summed over processes with the rest of /metrics). On
shutdown a worker sends what it holds and closes; the main process drains its Recorder only
after every worker has exited.

The address is the seam: a writer process of its own (issue 17) can take the Intake's place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from ..observe.interaction import Interaction
from . import record
from .privacy import Privacy
from .recorder import INLINE_BUILD_BYTES, Recorder
from .settings import AnalyticsConfig
from .stores import Record

log = logging.getLogger(__name__)

HEADER = 4
MAX_FRAME = 1 << 30
RECORD_BYTES = 8 * 1024  # the socket's buffer holds at most queue_size records of this size


def frame(records: list[Record]) -> bytes:
    payload = orjson.dumps(records)
    return len(payload).to_bytes(HEADER, "big") + payload


class Forwarder:
    """The analytics observer of a worker: builds records and sends them to `address`."""

    def __init__(self, address: Path, settings: AnalyticsConfig, backends: list[str],
                 registry: CollectorRegistry) -> None:
        self.settings = settings
        self.privacy = Privacy.from_settings(settings)
        self._address = address
        self._backends = backends
        self._batch: list[Record] = []
        self._building = 0
        self._writer: asyncio.StreamWriter | None = None
        self._limit = settings.queue_size * RECORD_BYTES
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="analytics-record")
        self._scheduled = False
        self._idle = asyncio.Event()
        self.dropped = Counter(  # the Recorder's, in the main process: /metrics shows the sum
            "ollama_analytics_dropped_total",
            "Records not stored: queue full, refused by the store, or still unwritten when "
            "shutdown's grace ran out",
            ["backend"], registry=registry)

    def _drop(self, n: int) -> None:
        for name in self._backends:
            self.dropped.labels(name).inc(n)

    # --- the observer protocol ---------------------------------------------------------------

    def started(self, interaction: Interaction) -> object:
        return None

    def finished(self, interaction: Interaction, token: object) -> None:
        if self._writer is None or self._building >= self.settings.queue_size:
            self._drop(1)
            return
        if interaction.request_bytes + interaction.response_bytes <= INLINE_BUILD_BYTES:
            try:
                rec = record.build(interaction, self.privacy)
            except Exception:
                log.exception("analytics: could not build a record")
                self._drop(1)
                return
            self._append(rec)
            return
        self._building += 1
        future = asyncio.get_running_loop().run_in_executor(
            self._builder, record.build, interaction, self.privacy)
        future.add_done_callback(self._built)

    def _built(self, future: asyncio.Future[Record]) -> None:
        self._building -= 1
        try:
            self._append(future.result())
        except Exception:
            log.exception("analytics: could not build a record")
            self._drop(1)
        if self._building == 0:
            self._idle.set()

    def _append(self, rec: Record) -> None:
        self._batch.append(rec)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        batch, self._batch = self._batch, []
        writer = self._writer
        if not batch:
            return
        if writer is None or writer.is_closing() \
                or writer.transport.get_write_buffer_size() > self._limit:
            self._drop(len(batch))
            return
        try:
            writer.write(frame(batch))
        except (OSError, TypeError) as exc:
            log.warning("analytics: could not forward %d records: %s", len(batch), exc)
            self._drop(len(batch))

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        _, self._writer = await asyncio.open_unix_connection(self._address)

    async def close(self) -> None:
        """Send what is built and held, within the drain grace, and close."""
        if self._building:
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.settings.drain_grace)
        self._builder.shutdown(wait=False)
        self._send()
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            await asyncio.wait_for(writer.drain(), self.settings.drain_grace)
            writer.close()
            await writer.wait_closed()
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("analytics: records of this worker may be lost: %s", exc)
            writer.transport.abort()


class Intake:
    """The main process's end: records from the workers' Forwarders, into `recorder`."""

    def __init__(self, address: Path, recorder: Recorder) -> None:
        self.address = address
        self._recorder = recorder
        self._server: asyncio.AbstractServer | None = None
        self._readers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.address)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._readers.add(task)
        try:
            while True:
                try:
                    head = await reader.readexactly(HEADER)
                except asyncio.IncompleteReadError:
                    return  # the worker closed its end
                size = int.from_bytes(head, "big")
                if size > MAX_FRAME:
                    log.warning("analytics: a worker sent a frame of %d bytes; dropped its "
                                "connection", size)
                    return
                records: list[Any] = orjson.loads(await reader.readexactly(size))
                for rec in records:
                    self._recorder.submit(rec)
        except (OSError, asyncio.IncompleteReadError, orjson.JSONDecodeError) as exc:
            log.warning("analytics: records from a worker were lost: %s", exc)
        finally:
            self._readers.discard(task)
            writer.close()

    async def close(self) -> None:
        """After the workers exited: take in what they sent, then stop listening."""
        if self._server is not None:
            self._server.close()
        if self._readers:
            await asyncio.wait(set(self._readers))
