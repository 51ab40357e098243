"""JSONL store: gzip-compressed JSON lines, one file a day, rotated by size.

Files are `interactions-YYYY-MM-DD.jsonl.gz`, then `interactions-YYYY-MM-DD.1.jsonl.gz`, … once
a file passes the size limit. Each batch is appended as its own gzip member, so a file is always
readable up to the last complete batch (zcat, Python's gzip, log shippers all read multi-member
files), and a crash loses at most the batch being written. The day is the record's UTC start
date. Write-only: searching needs SQLite or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from . import Record

T = TypeVar("T")
_NAME = re.compile(r"^interactions-(\d{4}-\d{2}-\d{2})(?:\.(\d+))?\.jsonl\.gz$")


def _day(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d")


class JsonlStore:
    name = "jsonl"

    def __init__(self, directory: Path, max_file_bytes: int) -> None:
        self.dir = directory
        self.max_file_bytes = max_file_bytes
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="jsonl-writer")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def open(self) -> None:
        await self._run(lambda: self.dir.mkdir(parents=True, exist_ok=True))

    def files(self) -> list[tuple[str, Path]]:
        """The store's files with their day, oldest first."""
        found = []
        for path in self.dir.glob("interactions-*.jsonl.gz"):
            m = _NAME.match(path.name)
            if m:
                found.append((m.group(1), int(m.group(2) or 0), path))
        return [(day, path) for day, _, path in sorted(found)]

    def _target(self, day: str) -> Path:
        """The file a record of `day` goes to: the day's newest, unless it is full."""
        index = 0
        while True:
            path = self.dir / (f"interactions-{day}.jsonl.gz" if index == 0
                               else f"interactions-{day}.{index}.jsonl.gz")
            nxt = self.dir / f"interactions-{day}.{index + 1}.jsonl.gz"
            if nxt.exists():
                index += 1
                continue
            if path.exists() and path.stat().st_size >= self.max_file_bytes:
                index += 1
                continue
            return path

    def _write(self, records: list[Record]) -> None:
        by_day: dict[str, list[bytes]] = {}
        for record in records:
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
            by_day.setdefault(_day(record.get("started_at") or 0.0), []).append(line)
        for day, lines in by_day.items():
            with open(self._target(day), "ab") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz:
                gz.write(b"".join(lines))

    async def write_batch(self, records: list[Record]) -> int:
        await self._run(self._write, records)
        return 0

    def _purge(self, older_than: float | None, max_bytes: int | None) -> int:
        deleted = 0
        files = self.files()
        if older_than is not None:
            # A file holds one UTC day; it goes once its whole day is before the cutoff's.
            cutoff = _day(older_than)
            for day, path in list(files):
                if day < cutoff:
                    path.unlink(missing_ok=True)
                    files.remove((day, path))
                    deleted += 1
        if max_bytes is not None:
            sizes = [path.stat().st_size for _, path in files]
            while files[:-1] and sum(sizes) > max_bytes:  # never the file being written
                files.pop(0)[1].unlink(missing_ok=True)
                sizes.pop(0)
                deleted += 1
        return -1 if deleted else 0  # files, not records: the count of records is unknown

    async def purge(self, older_than: float | None, max_bytes: int | None) -> int:
        return await self._run(self._purge, older_than, max_bytes)

    async def close(self) -> None:
        self._thread.shutdown(wait=True)
