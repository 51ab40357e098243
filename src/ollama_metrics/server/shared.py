"""The private directory the processes of `--workers N` share, and what each file in it is for.

The main process makes it (mode 0700) before any process imports prometheus_client, names it
in PROMETHEUS_MULTIPROC_DIR for every worker, and removes it on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ollama_metrics")


@dataclass(frozen=True)
class Shared:
    dir: Path

    @property
    def metrics(self) -> Path:
        """prometheus-client's multiprocess files (the variable points here)."""
        return self.dir / "metrics"

    @property
    def labels(self) -> Path:
        """The model label values admitted beyond /api/tags (observe/labels.py)."""
        return self.dir / "model-labels"

    @property
    def live(self) -> Path:
        """One file per worker: its requests in flight and latest ones (observe/live.py)."""
        return self.dir / "live"

    @property
    def loaded(self) -> Path:
        """The latest /api/ps answer, published by the main process (ollama/ps.py)."""
        return self.dir / "loaded.json"

    def live_file(self, pid: int) -> Path:
        return self.live / f"{pid}.json"


def port_sharing() -> bool:
    """Whether this system lets several processes listen on one port (SO_REUSEPORT)."""
    return hasattr(socket, "SO_REUSEPORT")


@contextlib.contextmanager
def prepared(workers: int) -> Iterator[Shared | None]:
    """For `--workers N` (N > 1, where the port can be shared): the private directory, named in
    PROMETHEUS_MULTIPROC_DIR for this process and the workers. Call it before anything imports
    prometheus_client: the variable is read once, at that import. None when one process serves
    (with a warning if more were asked and the system cannot share the port). The directory
    is removed on exit."""
    if workers <= 1:
        yield None
        return
    if not port_sharing():
        log.warning("--workers %d: this system cannot share a listening port (no "
                    "SO_REUSEPORT); serving with one process", workers)
        yield None
        return
    shared = Shared(Path(tempfile.mkdtemp(prefix="ollama-metrics-workers-")))  # mode 0700
    try:
        shared.metrics.mkdir()
        shared.live.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared.metrics)
        yield shared
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(shared.dir, ignore_errors=True)
