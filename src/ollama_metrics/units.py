"""How numbers read, written once for every text view (CLI tables, `status`, `top`).

Like the rest of the Ollama world: durations in milliseconds below a second (`0.7 ms`, `350 ms`,
`1.24 s`), sizes in KB/MB/GB as `ollama ps` shows them, a model kept loaded indefinitely "forever",
and one word, MISSING, for a value that is absent (a request without a model, a timing never
measured). The dashboard's twin of these functions is dashboard/static/js/format.js.
"""

from __future__ import annotations

from typing import Any

MISSING = "-"

# Ollama gives a model kept with keep_alive < 0 an expiry decades ahead (seen: 72 years); nobody
# sets a keep_alive of ten years on purpose, so past that it is forever.
FOREVER_SECONDS = 10 * 365 * 24 * 3600


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def seconds(value: Any, sep: str = " ") -> str:
    """A duration given in seconds: `0.7 ms`, `350 ms`, `1.24 s`, `12.5 s`, `3 min 05 s`.

    `sep=""` writes it without spaces, as Go prints a duration (`350ms`), for tables whose
    cells are split on spaces (`top`).
    """
    if not _number(value) or value != value:
        return MISSING
    if value < 0.01:
        ms = f"{value * 1000:.1f}".removesuffix(".0") if value > 0 else "0"
        return f"{ms}{sep}ms"
    if value < 1:
        return f"{value * 1000:.0f}{sep}ms"
    if value < 10:
        return f"{value:.2f}{sep}s"
    if value < 60:
        return f"{value:.1f}{sep}s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}{sep}min{sep}{secs:02d}{sep}s"
    return f"{minutes // 60}{sep}h{sep}{minutes % 60:02d}{sep}min"


def size(value: Any) -> str:
    """Bytes as `ollama ps` shows them (decimal units): `512 B`, `4.1 KB`, `272 MB`, `5.4 GB`."""
    if not _number(value) or value < 0:
        return MISSING
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            n = value / scale
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    return f"{int(value)} B"


def until(remaining: Any) -> str:
    """Time left before something happens, in words: `forever`, `4 minutes`, `2 hours`."""
    if not _number(remaining):
        return MISSING
    if remaining >= FOREVER_SECONDS:
        return "forever"
    remaining = max(0, round(remaining))
    for unit, scale in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if remaining >= scale:
            n = round(remaining / scale)
            return f"{n} {unit}{'' if n == 1 else 's'}"
    return f"{remaining} second{'' if remaining == 1 else 's'}"


def shorten(text: Any, width: int) -> str:
    """One line of at most `width` characters; a longer text ends in an ellipsis."""
    s = " ".join(str(text if text is not None else "").split())
    return s if len(s) <= width else s[: max(0, width - 1)] + "…"


def missing(value: Any) -> str:
    """The value as text, or MISSING when there is none."""
    return MISSING if value is None or value == "" else str(value)
