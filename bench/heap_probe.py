"""`python -m ollama_metrics` with SQLite's own heap made visible, for the soak.

Contract: ``python bench/heap_probe.py FILE ARGS...`` runs ``ollama_metrics`` with ``ARGS`` (e.g.
``serve --listen ...``) unchanged, and a daemon thread writes SQLite's heap in bytes
(``sqlite3_memory_used()``: page caches, statements, schemas of every connection) to ``FILE``
every 0.5 s, replacing it whole. The proxy's RSS includes that heap, which grows as the page
cache fills up to its configured size; the soak subtracts it to tell a bounded cache from a leak.
"""

from __future__ import annotations

import _sqlite3
import ctypes
import os
import sys
import threading
import time
from pathlib import Path


def _report(path: Path) -> None:
    # dlsym through the extension module finds the libsqlite3 it is linked with, statically or not.
    used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    used.restype = ctypes.c_int64
    partial = path.with_suffix(".partial")
    while True:
        partial.write_text(str(used()))
        os.replace(partial, path)
        time.sleep(0.5)


def main() -> None:
    path, args = Path(sys.argv[1]), sys.argv[2:]
    threading.Thread(target=_report, args=(path,), daemon=True).start()
    from ollama_metrics.cli import main as cli

    sys.argv = ["ollama-metrics", *args]
    cli()


if __name__ == "__main__":
    main()
