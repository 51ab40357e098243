"""Giving freed heap memory back to the operating system.

glibc's malloc keeps what a process frees for its next allocations, so RSS stays at its high-water
mark after SQLite lets its page caches go. `malloc_trim` hands the free pages back. Elsewhere
(macOS, Windows, musl) there is no such call and this does nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # absent from some minimal Python builds

        trim = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (ImportError, OSError, AttributeError):  # musl has no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (a few ms; called when idle, off the loop)."""
    if _TRIM is not None:
        _TRIM(0)
