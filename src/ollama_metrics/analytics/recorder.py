"""Bounded queues and background writers: analytics never delays or fails a request.

Each store has its own bounded queue and writer task, so a slow or broken store (Loki down,
PostgreSQL unreachable, a full disk) only costs its own counted drops. `submit` never waits: a
full queue drops the record and counts it. A writer takes whatever is queued (up to a batch),
writes it, and on failure retries the same batch with exponential back-off until it succeeds or
shutdown's grace runs out. `close` drains the queues within the grace period.
A periodic task enforces retention on every store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..observe.interaction import Interaction
from ..printable import printable
from . import record
from .privacy import Privacy
from .settings import AnalyticsConfig
from .stores import Record, Store

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
OPEN_TIMEOUT = 10.0
INLINE_BUILD_BYTES = 16 * 1024  # larger exchanges are built on the builder thread


@dataclass
class _Lane:
    """One store with its queue and writer."""

    store: Store
    queue: asyncio.Queue[Record]
    task: asyncio.Task[None] | None = None
    opened: bool = False
    failing_since: float | None = None
    inflight: int = 0  # records taken from the queue and not yet written


class Recorder:
    """The analytics observer: builds the record, queues it, writes it in the background."""

    def __init__(self, stores: list[Store], settings: AnalyticsConfig,
                 registry: CollectorRegistry) -> None:
        self.settings = settings
        self.privacy = Privacy.from_settings(settings)
        self.stores = stores
        self._lanes = [_Lane(s, asyncio.Queue(settings.queue_size)) for s in stores]
        self._closing = False
        self._deadline = float("inf")
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="analytics-record")
        self._building = 0  # records handed to the builder thread and not yet queued
        self._idle = asyncio.Event()
        self._cleanup: asyncio.Task[None] | None = None
        self.queue_size = Gauge(
            "ollama_analytics_queue_size", "Records waiting to be written", ["backend"],
            registry=registry, multiprocess_mode="livesum")
        self.queue_capacity = Gauge(
            "ollama_analytics_queue_capacity", "Most records a backend's queue holds",
            ["backend"], registry=registry, multiprocess_mode="livemax")
        self.writes = Counter(
            "ollama_analytics_writes_total",
            "Records by the outcome of each write attempt (errors are retried)",
            ["backend", "status"], registry=registry)
        self.dropped = Counter(
            "ollama_analytics_dropped_total",
            "Records not stored: queue full, refused by the store, or still unwritten when "
            "shutdown's grace ran out",
            ["backend"], registry=registry)
        for lane in self._lanes:
            name = lane.store.name
            self.queue_size.labels(name).set_function(lane.queue.qsize)
            self.queue_capacity.labels(name).set(settings.queue_size)
            self.writes.labels(name, "success")
            self.writes.labels(name, "error")
            self.dropped.labels(name)

    # --- the observer protocol (called from the request handler) ---------------------------

    def started(self, interaction: Interaction) -> object:
        return None

    def finished(self, interaction: Interaction, token: object) -> None:
        """Build the record (privacy applied) on the builder thread, then queue it.

        Redacting a long reply is milliseconds of regex work: done here it would stall every
        other stream on the event loop. Builds waiting for the thread count against the queue
        bound like queued records do, so a burst cannot grow memory without limit.
        """
        if (self._closing or self._building >= self.settings.queue_size
                or all(lane.queue.full() for lane in self._lanes)):  # nowhere to go: not built
            for lane in self._lanes:
                self.dropped.labels(lane.store.name).inc()
            return
        if interaction.request_bytes + interaction.response_bytes <= INLINE_BUILD_BYTES:
            # Small exchanges (most chat turns) are built right here: tens of microseconds,
            # less than handing them to a thread and contending for the GIL to get them back.
            try:
                rec = record.build(interaction, self.privacy)
            except Exception:
                log.exception("analytics: could not build a record")
                for lane in self._lanes:
                    self.dropped.labels(lane.store.name).inc()
                return
            self.submit(rec)
            return
        self._building += 1
        future = asyncio.get_running_loop().run_in_executor(
            self._builder, record.build, interaction, self.privacy)
        future.add_done_callback(self._built)

    def _built(self, future: asyncio.Future[Record]) -> None:
        self._building -= 1
        try:
            rec = future.result()
        except Exception:  # a record we cannot build is lost, loudly; the proxy carries on
            log.exception("analytics: could not build a record")
            for lane in self._lanes:
                self.dropped.labels(lane.store.name).inc()
        else:
            self.submit(rec)
        if self._building == 0:  # even after a failure, or close() would wait its whole grace
            self._idle.set()

    def submit(self, rec: Record) -> None:
        """Queue `rec` for every store; never waits. A full queue drops and counts."""
        for lane in self._lanes:
            if self._closing:
                self.dropped.labels(lane.store.name).inc()
                continue
            try:
                lane.queue.put_nowait(rec)
            except asyncio.QueueFull:
                self.dropped.labels(lane.store.name).inc()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open every store and start the writers. A store that cannot open now is retried
        by its writer in the background; its records queue meanwhile."""
        for lane in self._lanes:
            try:
                await asyncio.wait_for(lane.store.open(), OPEN_TIMEOUT)
                lane.opened = True
            except Exception as exc:
                log.warning("analytics: cannot open %s yet, retrying in the background: %s",
                            lane.store.name, exc or type(exc).__name__)
        for lane in self._lanes:
            lane.task = asyncio.create_task(self._write_loop(lane),
                                            name=f"analytics-{lane.store.name}")
        if self.settings.retention_days or self.settings.max_size_mb:
            self._cleanup = asyncio.create_task(self._cleanup_loop(), name="analytics-cleanup")

    async def close(self) -> None:
        """Stop accepting, write what is queued within the drain grace, close the stores."""
        self._deadline = time.monotonic() + self.settings.drain_grace
        if self._building:  # records of the last requests are still being built
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.settings.drain_grace)
        self._closing = True
        self._builder.shutdown(wait=False)
        if self._cleanup is not None:
            self._cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup
        for lane in self._lanes:
            await self._drain(lane)
        for lane in self._lanes:
            with contextlib.suppress(Exception):
                await lane.store.close()

    async def _drain(self, lane: _Lane) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(lane.queue.join(), max(0.0, self._deadline - time.monotonic()))
        if lane.task is not None:
            lane.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lane.task
        left = lane.queue.qsize() + lane.inflight
        if left:
            self.dropped.labels(lane.store.name).inc(left)
            log.warning("analytics: %d records for %s were not written before shutdown",
                        left, lane.store.name)

    # --- the writer ----------------------------------------------------------------------

    async def _write_loop(self, lane: _Lane) -> None:
        if not lane.opened:
            lane.opened = await self._retry(lane, lane.store.open, "open") is not None
        while True:
            batch = [await lane.queue.get()]
            while len(batch) < self.settings.batch_size and not lane.queue.empty():
                batch.append(lane.queue.get_nowait())
            lane.inflight = len(batch)
            refused = await self._retry(lane, partial(lane.store.write_batch, batch), "write",
                                        len(batch))
            # Records the store refused for good, or still unwritten when the grace ran out.
            self.dropped.labels(lane.store.name).inc(len(batch) if refused is None else refused)
            lane.inflight = 0
            for _ in batch:
                lane.queue.task_done()

    async def _retry(self, lane: _Lane, action: Callable[[], Awaitable[int | None]], what: str,
                     n: int = 0) -> int | None:
        """Run `action` until it succeeds or shutdown's grace runs out (None). A write returns
        how many of its `n` records the store refused for good; success counts the rest."""
        name = lane.store.name
        delay = BACKOFF_START
        while True:
            try:
                refused = await action() or 0
            except Exception as exc:
                if n:
                    self.writes.labels(name, "error").inc(n)
                if lane.failing_since is None:
                    lane.failing_since = time.monotonic()
                    log.warning("analytics: %s to %s failed, retrying: %s", what, name,
                                printable(exc or type(exc).__name__))
                else:
                    log.debug("analytics: %s to %s failed again: %s", what, name, printable(exc))
                if time.monotonic() + delay > self._deadline:
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if n > refused:
                self.writes.labels(name, "success").inc(n - refused)
            if lane.failing_since is not None:
                log.warning("analytics: %s to %s works again after %.1fs", what, name,
                            time.monotonic() - lane.failing_since)
                lane.failing_since = None
            return refused

    async def _cleanup_loop(self) -> None:
        max_bytes = int(self.settings.max_size_mb * 2**20) or None
        while True:
            older = (time.time() - self.settings.retention_days * 86400
                     if self.settings.retention_days else None)
            for lane in self._lanes:
                if not lane.opened:
                    continue
                try:
                    deleted = await lane.store.purge(older, max_bytes)
                except Exception as exc:
                    log.warning("analytics: cleanup of %s failed: %s", lane.store.name,
                                printable(exc))
                    continue
                if deleted:
                    log.info("analytics: removed %s from %s", f"{deleted} old records"
                             if deleted > 0 else "old files", lane.store.name)
            await asyncio.sleep(self.settings.cleanup_interval)
